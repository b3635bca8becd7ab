"""The equal-resources part of a study report: the answer to "which activation rate is best at equal N, C and
D, and does it beat the dense model?".

Per arm: best validation loss and bits/byte per seed with mean and t interval, granularity (E, K, D_e, D_se),
consumed and unique tokens and epochs. Across the MoE arms: a quadratic in log r_a through the arms' mean
best validation losses, its minimum r_a* within the grid, and an interval for r_a* from a seeded bootstrap over
seeds (`stats.fit_optimum`); a warning when the grid does not bracket the optimum. Bits per byte are the loss
divided by ln 2 and the validation set's bytes per token, one constant for every arm (all arms share the
tokenizer and the validation documents), so they have the same optimum and are not fitted apart.

`equal_resources_results` is called by `report.build_results` (its output is results.json's
"equal_resources"); `er_tables` and `er_summary` by the renderers; `plots` draws from the same dict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from megatron_moe.study.stats import MIN_SEEDS_FOR_INTERVAL, TOO_FEW, fit_optimum, summarize
from megatron_moe.text import human

if TYPE_CHECKING:
    from megatron_moe.study.records import RunData, StudyRecord, StudyResults


BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
"""The resampler's seed: fixed, so the same runs always give the same report."""

FIT_NOTE = ("a quadratic in log r_a fitted by least squares through the MoE arms' mean best validation losses (x = "
            "each arm's achieved r_a); r_a* is its minimum within the grid")


def _one(x: Any) -> Any:
    """A value that may differ across seeds (a list): the smallest, which is the conservative pool size."""
    return min(x) if isinstance(x, list) and x else x


def equal_resources_results(record: StudyRecord, complete: list[RunData], best: dict[str, dict[int, float]],
                            contract: list[dict[str, Any]], gaps: list[dict[str, Any]],
                            confidence: float) -> dict[str, Any] | None:
    """Everything the report shows about an equal-resources family (None when the study has none)."""
    fam = record.family
    if not fam:
        return None
    rows = {c["arm"]: c for c in contract}
    dense_arm = next((a.name for a in record.arms if not a.is_moe), None)
    gap_of = {g["moe"]: g for g in gaps if g["baseline"] == dense_arm}
    reuse = fam.get("reuse", "strict")
    arms = []
    for a in record.arms:
        name, match = a.name, a.match
        c = rows.get(name, {})
        consumed = _one(c.get("consumed_tokens"))
        consumed = consumed if isinstance(consumed, int) else a.planned_tokens
        pool = _one(c.get("unique_tokens"))
        pool = pool if isinstance(pool, int) else fam.get("data_unique_tokens", fam["unique_tokens"])
        # An arm reads the first `consumed` tokens of the stream: each once up to the pool, then again.
        unique = min(consumed, pool)
        bpb = {r.seed: r.best_row["val_bpb"] for r in complete
               if r.arm == name and r.best_row and "val_bpb" in r.best_row and r.seed in best[name]}
        loss = summarize([best[name][s] for s in sorted(best[name])], confidence).to_dict()
        gap = gap_of.get(name)
        arms.append({
            "arm": name, "is_moe": a.is_moe, "target_r_a": match.get("target_r_a"), "r_a": a.r_a,
            "inv_r_a": 1.0 / a.r_a, **match["granularity"], "nonembedding_params": a.nonembedding_params,
            "residual_pct": match.get("residual_pct"), "flops_per_token": match.get("flops_per_token"),
            "train_steps": a.train_steps, "consumed_tokens": consumed, "unique_tokens": unique,
            "epochs": consumed / unique if unique else None,
            "best_val_loss": {**loss, "per_seed": {str(s): v for s, v in sorted(best[name].items())}},
            "best_val_bpb": {**summarize([bpb[s] for s in sorted(bpb)], confidence).to_dict(),
                             "per_seed": {str(s): v for s, v in sorted(bpb.items())}},
            "gap_vs_dense": None if gap is None else {k: gap[k] for k in ("n", "mean", "std", "ci")},
        })
    moe = [x for x in arms if x["is_moe"]]
    dense = next((x for x in arms if not x["is_moe"]), None)
    opt = fit_optimum({x["r_a"]: {int(s): v for s, v in x["best_val_loss"]["per_seed"].items()} for x in moe},
                      confidence, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
    warnings = []
    fit = None
    if opt is None:
        warnings.append(f"equal-resources fit: {sum(1 for x in moe if x['best_val_loss']['n'])} of {len(moe)} MoE arms "
                        "have a best validation loss; fitting r_a* needs at least 3 activation rates")
    else:
        fit = opt.to_dict()
        fit["best_arm"] = next(x["arm"] for x in moe if x["r_a"] == opt.best_x)
        if opt.at_edge:
            f = opt.fit
            if f.vertex is None:
                why = "the fitted quadratic has no minimum (it opens downward or is nearly straight)"
            elif not f.interior:
                why = f"the quadratic's minimum (r_a = {f.vertex:.3g}) lies outside the grid"
            else:
                why = f"the lowest mean loss is at the grid's end (r_a = {opt.best_x:.3g})"
            end = opt.best_x if f.interior else f.x_opt
            side = "below" if end == f.x_min else "above"
            warnings.append(
                f"equal-resources optimum at the edge of the grid: {why}; r_a* = {f.x_opt:.3g} is where the fit is "
                f"lowest on r_a {f.x_min:.3g}..{f.x_max:.3g}, not a bracketed minimum. Extend "
                f"study.equal_resources.r_a {side} it")
        if opt.ci_low is None:
            warnings.append(f"equal-resources fit: too few seeds for an interval (r_a* has none below "
                            f"{MIN_SEEDS_FOR_INTERVAL} seeds that every MoE arm has)")
    return {
        "total_params": fam["total_params"], "unique_tokens": fam["unique_tokens"], "compute": fam["compute"],
        "flops": fam["flops"], "reuse": reuse, "granularity": fam.get("granularity", "free"),
        "metric": "best validation loss (nats/token); bits/byte at the best evaluation",
        "fit_method": FIT_NOTE,
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED,
                      "scheme": "seeds drawn with replacement, the same draw for every arm (paired), refitted, minimum "
                                "within the grid"},
        "arms": arms,
        "dense": None if dense is None else dense["arm"],
        "fit": fit,
        "answer": _answer(fit, dense, moe, confidence),
        "warnings": warnings,
    }


def _answer(fit: dict[str, Any] | None, dense: dict[str, Any] | None, moe: list[dict[str, Any]],
            confidence: float) -> str:
    """The study's answer in one or two sentences."""
    conf = f"{100 * confidence:g}%"
    parts = []
    if fit is not None:
        lo, hi = fit["ci"]
        ci = f" ({TOO_FEW})" if lo is None else f" ({conf} seed-bootstrap interval {lo:.3g} to {hi:.3g})"
        edge = ", at the edge of the grid" if fit["at_edge"] else ""
        parts.append(f"Fitted optimum r_a* = {fit['x_opt']:.3g}{ci}{edge}, fitted best validation loss "
                     f"{fit['y_opt']:.4f} there.")
    better = [x for x in moe if x["gap_vs_dense"] and x["gap_vs_dense"]["ci"][0] is not None
              and x["gap_vs_dense"]["ci"][0] > 0]
    worse = [x for x in moe if x["gap_vs_dense"] and x["gap_vs_dense"]["ci"][1] is not None
             and x["gap_vs_dense"]["ci"][1] < 0]
    gaps = [x for x in moe if x["gap_vs_dense"] and x["gap_vs_dense"]["mean"] is not None]
    if dense is not None and dense["best_val_loss"]["mean"] is not None and gaps and \
            all(x["gap_vs_dense"]["ci"][0] is None for x in gaps):
        parts.append(f"Dense baseline {dense['best_val_loss']['mean']:.4f}; paired gaps to it (dense - MoE, "
                     f"{TOO_FEW}): " + ", ".join(f"{x['arm']} {x['gap_vs_dense']['mean']:+.4f}" for x in gaps) + ".")
    elif dense is not None and dense["best_val_loss"]["mean"] is not None:
        parts.append(f"Dense baseline {dense['best_val_loss']['mean']:.4f}; MoE arms better than it ({conf} t "
                     f"interval of the paired gap above 0): {', '.join(x['arm'] for x in better) or 'none'}; worse: "
                     f"{', '.join(x['arm'] for x in worse) or 'none'}.")
    return " ".join(parts)


def er_summary(results: StudyResults) -> str:
    """The answer sentence (empty for a study without an equal-resources family)."""
    er = results.equal_resources
    return f"Equal resources: {er['answer']}" if er and er["answer"] else ""


def mean_ci(st: dict[str, Any] | None, digits: int = 4) -> str:
    """Mean and its t interval, one table cell ("n/a" without a mean)."""
    if st is None or st["mean"] is None:
        return "n/a"
    lo, hi = st["ci"]
    return f"{st['mean']:.{digits}f}" + (f" ({TOO_FEW})" if lo is None else f" [{lo:.{digits}f}, {hi:.{digits}f}]")


def er_tables(results: StudyResults) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, note, header, rows) of the equal-resources tables; [] for a study without the family."""
    er = results.equal_resources
    if not er:
        return []
    conf = f"{100 * results.confidence:g}%"
    seeds = [str(s) for s in results.seeds]
    by_arm = {x["arm"]: x for x in er["arms"]}
    dense = by_arm.get(er["dense"]) if er["dense"] else None
    fit = er["fit"]
    boot = er["bootstrap"]
    tail = 50 * (1 - results.confidence)
    n_seeds = max((x["best_val_loss"]["n"] for x in er["arms"]), default=0)
    few_seeds = f"; with {n_seeds} seeds per arm a rough interval" if MIN_SEEDS_FOR_INTERVAL <= n_seeds < 5 else ""
    out = [(
        "Equal resources: optimal activation rate",
        f"r_a* from {er['fit_method']}. Interval: the {tail:g}-{100 - tail:g} percentiles of r_a* over "
        f"{boot['resamples']} bootstrap resamples of the seeds ({boot['scheme']}; resampler seed {boot['seed']})"
        f"{few_seeds}. "
        f"Dense: mean best validation loss and its {conf} t interval. All arms: N = {human(er['total_params'])} "
        f"non-embedding parameters, C = {er['compute']:.4g} FLOPs ({er['flops']} convention), dense tokens D = "
        f"{human(er['unique_tokens'])}; {er['reuse']} reuse; granularity {er['granularity']}. {er['answer']}",
        ["r_a*", "interval", "fitted loss at r_a*", "bracketed", "lowest-mean arm", "dense loss", "reuse",
         "granularity"],
        [[f"{fit['x_opt']:.4f}" if fit else "n/a",
          f"[{fit['ci'][0]:.4f}, {fit['ci'][1]:.4f}]" if fit and fit["ci"][0] is not None
          else TOO_FEW if fit else "n/a",
          f"{fit['y_opt']:.4f}" if fit else "n/a", ("no (edge)" if fit["at_edge"] else "yes") if fit else "n/a",
          fit["best_arm"] if fit else "n/a", mean_ci(dense["best_val_loss"]) if dense else "n/a", er["reuse"],
          er["granularity"]]],
    )]
    out.append((
        "Equal resources: arms",
        f"Per arm: target and achieved r_a, granularity (E routed experts, top-K, expert size D_e, shared-expert "
        f"size D_se), non-embedding N and its residual against the dense baseline, consumed tokens, unique tokens "
        f"read and epochs over them (consumed / unique); best validation loss and bits/byte at the best "
        f"evaluation: mean [{conf} t interval] and per seed; paired gap vs the dense baseline (dense minus MoE, > 0: "
        f"MoE better). Under fresh reuse every arm reads a prefix of one shared stream, so the Contract table's "
        f"unique tokens are that pool and its epochs the share of it read.",
        ["arm", "target r_a", "r_a", "E", "K", "D_e", "D_se", "N", "resid %", "consumed tok", "unique tok",
         "epochs", "best val loss", *[f"seed {s}" for s in seeds], "bits/byte", "gap vs dense"],
        [[x["arm"], "-" if x["target_r_a"] is None or not x["is_moe"] else f"{x['target_r_a']:.3g}",
          f"{x['r_a']:.4f}", str(x["experts"]), str(x["top_k"]), str(x["expert_ffn"]), str(x["shared_ffn"]),
          human(x["nonembedding_params"]), "-" if x["residual_pct"] is None else f"{x['residual_pct']:+.3f}",
          human(x["consumed_tokens"]), human(x["unique_tokens"]),
          "n/a" if x["epochs"] is None else f"{x['epochs']:.2f}", mean_ci(x["best_val_loss"]),
          *[f"{x['best_val_loss']['per_seed'][s]:.4f}" if s in x["best_val_loss"]["per_seed"] else "n/a"
            for s in seeds],
          mean_ci(x["best_val_bpb"]), mean_ci(x["gap_vs_dense"])]
         for x in er["arms"]],
    ))
    return out
