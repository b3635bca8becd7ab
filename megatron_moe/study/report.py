"""Study reports: pure functions from a study directory (the study record, study.json, and the run directories, read
through `records.load_study_dir`) to numbers, tables and plots; every number comes from `metrics.jsonl`,
`result.json` and the study record, never from stdout.

Per arm: each seed's best (minimum over evaluations) validation loss, then mean, sample std and a Student-t
interval over seeds (`stats`). Per pair (baseline, MoE): the per-seed gap best_val(baseline) - best_val(MoE)
(positive = the MoE is better) with the same statistics, also at every evaluation step both arms reached.

Per seed, the arms' data fingerprints must be equal (the runs of one seed share a data order; with
study.data_order = "per_seed" the orders differ across seeds); the report warns when they are not. It also
states the ordering of the arms' mean best validation loss and in how many seeds each seed's own ordering is the
same, and warns about runs whose best evaluation is their last one (still improving: the budget is too short
to call a best). Intervals are Student-t intervals over seeds everywhere, tables and plots alike.

`write_report` writes report.md, report.html (self-contained: PNGs inlined as base64), results.json and
plots/*.png atomically (`plots`, with matplotlib, a dependency; an environment without it gets tables only).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from megatron_moe import directories
from megatron_moe.config import ConfigError
from megatron_moe.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from megatron_moe.study.plots import make_plots
from megatron_moe.study.records import RunData, StudyRecord, StudyResults, load_study_dir
from megatron_moe.study.report_er import (
    equal_resources_results,
    er_summary,
    er_tables,
    mean_ci,
)
from megatron_moe.study.stats import MIN_SEEDS_FOR_INTERVAL, TOO_FEW, ordering, paired, summarize
from megatron_moe.text import human


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def build_results(study_dir: str | Path, confidence: float = 0.95,
                  loaded: tuple[StudyRecord, list[RunData]] | None = None) -> StudyResults:
    """Everything the report shows, as plain data (written as results.json); `loaded`: what `load_study_dir`
    returned for `study_dir`, when the caller has it."""
    study_dir = Path(study_dir)
    record, runs = loaded or load_study_dir(study_dir)
    warnings: list[str] = list(record.design_warnings)
    arm_names = [a.name for a in record.arms]
    complete = [r for r in runs if r.complete]
    best: dict[str, dict[int, float]] = {a: {} for a in arm_names}
    run_rows = []
    for r in runs:
        b = r.best
        row = {"arm": r.arm, "seed": r.seed, "dir": str(r.dir.relative_to(study_dir)), "complete": r.complete,
               "best_val_loss": b[0] if b else None, "best_val_step": b[1] if b else None,
               "last_eval_step": r.evals[-1]["step"] if r.evals else None,
               "best_is_last": bool(r.complete and b and b[1] == r.evals[-1]["step"]),
               "steps": r.train[-1]["step"] if r.train else 0,
               "final_train_loss": r.result.final_train_loss if r.result else r.train[-1]["loss"] if r.train else None,
               "train_time_s": r.result.train_time_s if r.result else None}
        run_rows.append(row)
        if r.damaged_lines:
            n = len(r.damaged_lines)
            warnings.append(f"{row['dir']}: {n} unreadable metrics.jsonl line{'s' if n > 1 else ''} left out "
                            f"(--allow-damaged): {', '.join(map(str, r.damaged_lines))}")
        if not r.complete:
            continue
        if b is None:
            warnings.append(f"{row['dir']}: complete but metrics.jsonl has no eval rows")
            continue
        best[r.arm][r.seed] = b[0]
        rb = r.result.best_val_loss
        if rb is not None and not _close(rb, b[0]):
            warnings.append(f"{row['dir']}: result.json best_val_loss {rb} differs from metrics.jsonl's {b[0]}")

    arms_out = []
    for a in record.arms:
        name = a.name
        st = summarize([best[name][s] for s in sorted(best[name])], confidence)
        finals = [r.result.final_train_loss for r in complete  # result.json: metrics.jsonl may lack rows
                  if r.arm == name and r.result.final_train_loss is not None]
        bpb = [r.best_row["val_bpb"] for r in complete if r.arm == name and r.best_row and "val_bpb" in r.best_row]
        # Routing balance at the end of training: max/mean tokens per expert, averaged over MoE layers.
        imbalance = [r.train[-1]["load_imbalance"] for r in complete
                     if r.arm == name and r.train and "load_imbalance" in r.train[-1]]
        arms_out.append({
            "arm": name, "contract": a.contract, "is_moe": a.is_moe,
            "seeds": sorted(best[name]), "missing_seeds": [s for s in record.seeds if s not in best[name]],
            "best_val_loss": {**st.to_dict(), "per_seed": {str(s): v for s, v in sorted(best[name].items())}},
            "best_val_bpb": summarize(bpb, confidence).to_dict(),
            "final_train_loss": summarize(finals, confidence).to_dict(),
            "final_load_imbalance": summarize(imbalance, confidence).to_dict(),
        })

    tokens_per_step = {a.name: a.tokens_per_step for a in record.arms}
    gaps = []
    for p in record.pairs:
        per_seed, st = paired(best[p.baseline], best[p.moe], confidence)
        gaps.append({**dataclasses.asdict(p), "per_seed": {str(s): v for s, v in per_seed.items()}, **st.to_dict(),
                     "ordering": ordering(best, [p.moe, p.baseline]),
                     "over_training": gap_over_training(
                         [r for r in complete if r.arm == p.baseline], [r for r in complete if r.arm == p.moe],
                         confidence, tokens_per_step[p.baseline])})

    contract, data_ok, fingerprints = contract_table(record, complete)
    if data_ok is False:
        differ = {seed: fps for seed, fps in fingerprints.items() if len(set(fps.values())) != 1 or None in fps.values()}
        warnings.insert(0, "DATA DIFFERS ACROSS ARMS: the data fingerprints of one seed's arms are not all equal ("
                           + "; ".join(f"seed {seed}: " + ", ".join(f"{a} {fp}" for a, fp in fps.items())
                                       for seed, fps in differ.items()) + "); the comparison is not fair")
    last = [f"{r['arm']} seed {r['seed']}" for r in run_rows if r["best_is_last"]]
    if last:
        warnings.append(f"{len(last)} of {len(complete)} complete runs have their best validation loss at their last "
                        f"evaluation ({', '.join(last)}): still improving when training stopped, so the budget is too "
                        "short to call a best (their best is their final loss)")
    few = [f"{a['arm']} ({a['best_val_loss']['n']})" for a in arms_out
           if 0 < a["best_val_loss"]["n"] < MIN_SEEDS_FOR_INTERVAL]
    if few:
        warnings.append(f"{TOO_FEW} where fewer than {MIN_SEEDS_FOR_INTERVAL} seeds are complete: {', '.join(few)}; "
                        "those arms' intervals, and the gaps' that involve them, are left out")
    missing = [f"{r['arm']} seed {r['seed']}" for r in run_rows if not r["complete"]]
    if missing:
        warnings.append(f"{len(missing)} of {len(runs)} runs are not complete (left out): {', '.join(missing)}")
    er = equal_resources_results(record, complete, best, contract, gaps, confidence)
    warnings += er["warnings"] if er else []
    regime = capacity_regime(record, best)
    if regime and not regime["pays"]:
        warnings.append(f"extra parameters do not pay yet at this budget ({regime['line']}): a MoE only adds "
                        "capacity, so this comparison cannot show what the published studies show (dense_total < moe "
                        "< dense_active)")
    return StudyResults(
        study=record.name,
        study_dir=str(study_dir),
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        confidence=confidence,
        metric="best validation loss (minimum over periodic evaluations), nats/token",
        gap_sign=record.gap_sign or "gap = loss(baseline) - loss(MoE); positive = the MoE is better",
        seeds=record.seeds,
        data_seed=record.data_seed,
        data_order=record.data_order,
        data_seeds=record.data_seeds,
        arms=arms_out,
        ordering=ordering(best, arm_names),
        regime=regime,
        gaps=gaps,
        contract=contract,
        data_fingerprints_equal=data_ok,
        fingerprints=fingerprints,
        family=record.family,
        equal_resources=er,
        runs=run_rows,
        environment=record.environment,
        git=record.git,
        warnings=warnings,
    )


def gap_over_training(baseline: list[RunData], moe: list[RunData], confidence: float = 0.95,
                      tokens_per_step: int | None = None) -> list[dict[str, Any]]:
    """Per evaluation step both arms reached: the per-seed gap val(baseline) - val(moe), mean ± std, CI."""
    b = {r.seed: {e["step"]: e["val_loss"] for e in r.evals} for r in baseline}
    m = {r.seed: {e["step"]: e["val_loss"] for e in r.evals} for r in moe}
    seeds = sorted(set(b) & set(m))
    steps = sorted(set().union(*(set(b[s]) & set(m[s]) for s in seeds))) if seeds else []
    out = []
    for step in steps:
        vals = [b[s][step] - m[s][step] for s in seeds if step in b[s] and step in m[s]]
        out.append({"step": step, "tokens": step * tokens_per_step if tokens_per_step else None,
                    **summarize(vals, confidence).to_dict()})
    return out


def seed_fingerprints(record: StudyRecord, complete: list[RunData]) -> dict[str, dict[str, str | None]]:
    """{seed: {arm: fingerprint}}: what each complete run's result.json reports (None when it reports none),
    else what the runner's data check planned for that run; a run with neither is left out."""
    planned = record.data or {}
    done = {(r.seed, r.arm): r for r in complete if r.result is not None}
    out: dict[str, dict[str, str | None]] = {}
    for seed in record.seeds:
        row: dict[str, str | None] = {}
        for a in record.arms:
            run = done.get((seed, a.name))
            if run is not None:
                row[a.name] = run.result.data.get("fingerprint")
            elif fp := ((planned.get(str(seed)) or {}).get(a.name) or {}).get("fingerprint"):
                row[a.name] = fp
        if row:
            out[str(seed)] = row
    return out


def contract_table(record: StudyRecord, complete: list[RunData]
                   ) -> tuple[list[dict[str, Any]], bool | None, dict[str, dict[str, str | None]]]:
    """Per arm: parameters (total/active, with the planner's residual), FLOPs/token, tokens and the data
    fingerprints of its runs by seed; the fingerprints per seed and arm (`seed_fingerprints`), and whether the
    arms of every seed share one (None: none known). Arms are compared within a seed: with
    study.data_order = "per_seed" each seed has its own data order."""
    fingerprints = seed_fingerprints(record, complete)
    rows = []
    for a in record.arms:
        datas = [r.result.data for r in complete if r.arm == a.name and r.result]
        planned = [arms[a.name] for arms in (record.data or {}).values() if a.name in arms]

        def same(key: str) -> Any:
            """The value all complete runs report (a list when they disagree); the planned one before any ran."""
            vals = sorted({json.dumps(d.get(key)) for d in (datas or planned)})
            if not vals:
                return None
            return json.loads(vals[0]) if len(vals) == 1 else [json.loads(v) for v in vals]

        by_seed = {seed: fps[a.name] for seed, fps in fingerprints.items() if a.name in fps}
        if len(set(by_seed.values())) == 1:
            shown = next(iter(by_seed.values())) or "none reported"
        else:
            shown = ", ".join(f"s{seed} {fp or 'none reported'}" for seed, fp in by_seed.items())
        match = a.match
        consumed = same("consumed_tokens")
        tokens = consumed if isinstance(consumed, int) else a.planned_tokens
        flops_per_token = match.get("flops_per_token", a.flops_train_per_token)  # the family's convention if any
        rows.append({
            "arm": a.name, "contract": a.contract,
            "total_params": a.total_params, "active_params": a.active_params,
            "nonembedding_params": a.nonembedding_params, "nonembedding_active_params": a.nonembedding_active_params,
            "r_a": a.r_a,
            "matched_quantity": match.get("quantity"), "target": match.get("target"),
            "achieved": match.get("achieved"), "residual_pct": match.get("residual_pct"),
            "flops_train_per_token": a.flops_train_per_token, "flops_er_per_token": a.flops_er_per_token,
            "train_steps": a.train_steps, "planned_tokens": a.planned_tokens,
            "consumed_tokens": consumed, "unique_tokens": same("unique_tokens"),
            "train_flops": tokens * flops_per_token,
            "epochs": same("epochs"),
            "fingerprint": shown or None,
            "fingerprints": by_seed,
            "changed_fields": a.changed_fields, "changes": a.changes,
        })
    if not fingerprints:
        data_ok = None
    else:
        data_ok = all(len(set(fps.values())) == 1 and None not in fps.values() for fps in fingerprints.values())
    return rows, data_ok, fingerprints


def _f(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        return f"{x:.{digits}f}"
    return str(x)


def _big(x: Any) -> str:
    """`human` for a count that may be unknown (None) or differ across runs (a list, shown a / b)."""
    if x is None:
        return "n/a"
    if isinstance(x, list):
        return " / ".join(_big(v) for v in x)
    return human(x)


def _pm(st: dict[str, Any], digits: int = 4) -> str:
    if st["mean"] is None:
        return "n/a"
    return f"{st['mean']:.{digits}f} ± {_f(st['std'], digits)}"


def _ci(st: dict[str, Any], digits: int = 4) -> str:
    lo, hi = st["ci"]
    if lo is None:
        return TOO_FEW if st.get("n") else "n/a"
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def _epochs(x: Any) -> str:
    if x is None:
        return "n/a"
    return " / ".join(f"{v:.3f}" for v in x) if isinstance(x, list) else f"{x:.3f}"


def _data_note(results: StudyResults) -> str:
    """How the runs' data seeds were chosen, one sentence."""
    if results.data_order == "shared":
        return f"One data order for every run: data.seed {results.data_seed} for all arms and seeds."
    return (f"One data order per seed, shared by that seed's arms: data.seed = {results.data_seed} + seed, so "
            "the spread over seeds includes data-order noise as well as init noise.")


def capacity_regime(record: StudyRecord, best: dict[str, dict[int, float]]) -> dict[str, Any] | None:
    """Whether extra parameters pay at this budget: the dense arm matched to the MoE's total parameters against the
    one matched to its active parameters, paired by seed (None without both arms). It pays when the larger is ahead
    in every seed, by more on average than the seeds' spread."""
    dense = {a.contract: a.name for a in record.arms if not a.is_moe}
    small, large = dense.get("active"), dense.get("total")
    if not best.get(small) or not best.get(large):
        return None
    seeds = sorted(set(best[small]) & set(best[large]))
    if not seeds:
        return None
    ahead = [best[small][s] - best[large][s] for s in seeds]  # > 0: the larger is better
    mean = sum(ahead) / len(ahead)
    spread = (sum((a - mean) ** 2 for a in ahead) / (len(ahead) - 1)) ** 0.5 if len(ahead) > 1 else 0.0
    wins = sum(a > 0 for a in ahead)
    pays = wins == len(ahead) and mean > spread
    line = (f"{large} {'ahead of' if mean > 0 else 'not ahead of'} {small} by {mean:+.4f} nats/token on "
            f"average (seed spread {spread:.4f}), ahead in {wins}/{len(ahead)} seeds")
    return {"per_seed": {str(s): a for s, a in zip(seeds, ahead)}, "mean": mean, "std": spread, "wins": wins,
            "n": len(ahead), "pays": pays, "line": line}


def ordering_lines(results: StudyResults) -> list[str]:
    """The ordering of the arms' mean best validation loss and in how many seeds it holds: all arms, then each
    paired comparison; then whether extra parameters pay (the regime check)."""
    lines = []
    if results.ordering:
        lines.append(f"all arms: {results.ordering['line']}")
    lines += [f"{g['name']}: {g['ordering']['line']}" for g in results.gaps if g.get("ordering")]
    if results.regime:
        lines.append(f"regime: {results.regime['line']}")
    return lines


def tables(results: StudyResults) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, note, header, rows) of every table of the report, shared by the Markdown and HTML renderers."""
    conf = f"{100 * results.confidence:g}%"
    seeds = [str(s) for s in results.seeds]
    out = er_tables(results)  # an equal-resources study's answer comes first
    out.append((
        "Best validation loss per arm",
        f"Minimum over periodic evaluations; mean ± sample std over seeds, {conf} t interval. Final load imbalance:"
        " max / mean tokens per expert at the last logged step, averaged over MoE layers (1 = uniform)."
        + (f" Ordering of the means (seeds whose own ordering is the same): {results.ordering['line']}."
           if results.ordering else ""),
        ["arm", "n", "mean ± std", f"{conf} CI", *[f"seed {s}" for s in seeds], "bits/byte at best",
         "final train loss", "final load imbalance"],
        [[a["arm"], str(a["best_val_loss"]["n"]), _pm(a["best_val_loss"]), _ci(a["best_val_loss"]),
          *[_f(a["best_val_loss"]["per_seed"].get(s)) for s in seeds], _pm(a["best_val_bpb"]), _pm(a["final_train_loss"]),
          _pm(a["final_load_imbalance"], 2) if a["is_moe"] else "-"]
         for a in results.arms],
    ))
    if results.gaps:
        out.append((
            "Paired gaps",
            f"{results.gap_sign}. Paired per seed; mean ± sample std, {conf} t interval; ordering: of the two "
            "arms' mean best validation loss, and in how many seeds each seed's own ordering is the same.",
            ["comparison", "baseline", "MoE", "n", "gap mean ± std", f"{conf} CI", *[f"seed {s}" for s in seeds],
             "ordering"],
            [[g["name"], g["baseline"], g["moe"], str(g["n"]), _pm(g), _ci(g), *[_f(g["per_seed"].get(s)) for s in seeds],
              g["ordering"]["line"] if g.get("ordering") else "n/a"]
             for g in results.gaps],
        ))
        steps = sorted({p["step"] for g in results.gaps for p in g["over_training"]})
        if steps:
            by = {g["name"]: {p["step"]: p for p in g["over_training"]} for g in results.gaps}
            out.append((
                "Gap over training",
                f"Validation-loss gap at each evaluation step both arms reached: mean [{conf} t interval over seeds].",
                ["step", *[g["name"] for g in results.gaps]],
                [[str(s), *[mean_ci(by[g["name"]][s]) if s in by[g["name"]] else "" for g in results.gaps]] for s in steps],
            ))
    out.append((
        "Contract",
        "Parameters and FLOPs/token from the planner's ledger (exact count; non-embedding N, N_a; r_a = N_a / N); the "
        "matched quantity's target, achieved value and residual; tokens, epochs and data fingerprints (per seed when "
        "they differ across seeds) from each run's result.json; train FLOPs = consumed tokens x FLOPs/token (an "
        "equal-resources family's convention when it has one).",
        ["arm", "params total", "params active", "N", "N_a", "r_a", "matched", "target", "achieved", "resid %",
         "train FLOPs/tok", "steps", "consumed tok", "train FLOPs", "unique tok", "epochs", "data fingerprint",
         "changed vs base"],
        [[c["arm"], _big(c["total_params"]), _big(c["active_params"]), _big(c["nonembedding_params"]),
          _big(c["nonembedding_active_params"]), f"{c['r_a']:.3f}", c["matched_quantity"] or "(base)",
          _big(c["target"]), _big(c["achieved"]), "-" if c["residual_pct"] is None else f"{c['residual_pct']:+.3f}",
          _big(c["flops_train_per_token"]), str(c["train_steps"]), _big(c["consumed_tokens"]), _big(c["train_flops"]),
          _big(c["unique_tokens"]),
          _epochs(c["epochs"]), c["fingerprint"] or "n/a",
          ", ".join(f"{k.removeprefix('model.')}={v}" for k, v in c["changes"].items()) or "-"]
         for c in results.contract],
    ))
    fps = results.fingerprints
    out.append((
        "Data per seed",
        _data_note(results) + " The arms of a seed must share one data fingerprint (what each complete run's "
        "result.json reports, else what the runner's data check planned).",
        ["seed", "data.seed", "fingerprint", "arms equal"],
        [[s, str(results.data_seeds.get(s, "n/a")),
          ", ".join(sorted({str(fp) for fp in fps[s].values()})) if len(set(fps[s].values())) == 1 else
          ", ".join(f"{arm} {fp}" for arm, fp in fps[s].items()),
          "yes" if len(set(fps[s].values())) == 1 and None not in fps[s].values() else "NO"]
         if s in fps else [s, str(results.data_seeds.get(s, "n/a")), "n/a", "n/a"] for s in seeds],
    ))
    out.append((
        "Runs",
        "",
        ["arm", "seed", "complete", "steps", "best val loss", "at step", "last eval", "train time s", "directory"],
        [[r["arm"], str(r["seed"]), "yes" if r["complete"] else "NO", str(r["steps"]), _f(r["best_val_loss"]),
          _f(r["best_val_step"]) + (" (last)" if r["best_is_last"] else ""), _f(r["last_eval_step"]),
          _f(r["train_time_s"], 1), r["dir"]] for r in results.runs],
    ))
    return out


_FINGERPRINTS = {True: "equal across the arms of every seed", False: "NOT EQUAL ACROSS ARMS",
                 None: "unknown (no run complete)"}


def _intro(results: StudyResults) -> str:
    return (f"Generated {results.generated} from {results.study_dir}. Metric: {results.metric}. Seeds "
            f"{results.seeds} (train.seed = seed). {_data_note(results)} {er_summary(results)}").rstrip()


def render_markdown(results: StudyResults, plot_files: list[str]) -> str:
    lines = [f"# Study report: {results.study}", "", _intro(results), ""]
    fp = _FINGERPRINTS[results.data_fingerprints_equal]
    lines += [f"Data fingerprint: {f'**{fp}** of one seed' if results.data_fingerprints_equal is False else fp}.", ""]
    if ordering_lines(results):
        lines += ["Ordering of mean best validation loss (in how many seeds it holds):", ""]
        lines += [f"- {line}" for line in ordering_lines(results)] + [""]
    for w in results.warnings:
        lines += [f"> **WARNING:** {w}", ""]
    for title, note, header, rows in tables(results):
        lines += [f"## {title}", ""]
        if note:
            lines += [note, ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines.append("")
    lines += ["## Plots", ""]
    if plot_files:
        lines += [f"![{Path(p).stem}]({p})" for p in plot_files]
    else:
        lines.append("(no plots: matplotlib is not installed; `pip install matplotlib`)")
    lines.append("")
    env, git = results.environment or {}, results.git or {}
    lines.append(f"Versions: {', '.join(f'{k} {v}' for k, v in env.items())}. "
                 f"Git: {git.get('commit', 'n/a')}{' (modified)' if git.get('dirty') else ''}.")
    return "\n".join(lines) + "\n"


# A table is its own horizontal scroll container (display:block, overflow-x:auto), so a wide contract table
# scrolls inside the page instead of being cut at the window's edge.
_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;margin:1em 0;display:block;max-width:100%;overflow-x:auto}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}td:first-child,th:first-child{text-align:left}
th{background:#f0f0f0}.warn{background:#fdd;border:2px solid #c00;padding:.6em;font-weight:bold}img{max-width:100%}
.note{color:#555}"""


def render_html(results: StudyResults, plots: dict[str, bytes]) -> str:
    """One self-contained page: tables and the PNG plots inlined as base64 data URIs."""
    e = html.escape
    fp = e(_FINGERPRINTS[results.data_fingerprints_equal])
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(results.study)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>Study report: {e(results.study)}</h1>",
             f"<p>{e(_intro(results))}</p>",
             f"<p>Data fingerprint: {f'<b>{fp}</b> of one seed' if results.data_fingerprints_equal is False else fp}.</p>"]
    if ordering_lines(results):
        parts.append("<p>Ordering of mean best validation loss (in how many seeds it holds):</p><ul>"
                     + "".join(f"<li>{e(line)}</li>" for line in ordering_lines(results)) + "</ul>")
    parts += [f"<p class='warn'>WARNING: {e(w)}</p>" for w in results.warnings]
    for title, note, header, rows in tables(results):
        parts.append(f"<h2>{e(title)}</h2>")
        if note:
            parts.append(f"<p class='note'>{e(note)}</p>")
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append("<h2>Plots</h2>")
    if plots:
        for name, data in plots.items():
            parts.append(f"<p><img alt='{e(name)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'></p>")
    else:
        parts.append("<p>(no plots: matplotlib is not installed)</p>")
    env, git = results.environment or {}, results.git or {}
    parts.append(f"<p class='note'>Versions: {e(', '.join(f'{k} {v}' for k, v in env.items()))}. Git: "
                 f"{e(str(git.get('commit', 'n/a')))}{' (modified)' if git.get('dirty') else ''}.</p></body></html>")
    return "\n".join(parts) + "\n"


def write_report(study_dir: str | Path, out_dir: str | Path | None = None, confidence: float = 0.95,
                 allow_damaged: bool = False) -> dict[str, Path]:
    """Write report.md, report.html, results.json and plots/*.png (default: into the study directory)."""
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"--confidence {confidence} must be in (0, 1)")
    study_dir = Path(study_dir)
    out = Path(out_dir) if out_dir else study_dir
    loaded = load_study_dir(study_dir, allow_damaged)
    results = build_results(study_dir, confidence, loaded)
    plots = make_plots(results, *loaded)
    paths = {}
    for name, data in plots.items():
        atomic_write_bytes(out / directories.PLOTS / name, data)
        paths[name] = out / directories.PLOTS / name
    atomic_write_json(out / directories.RESULTS, dataclasses.asdict(results))
    atomic_write_text(out / directories.REPORT_MD, render_markdown(results, [f"{directories.PLOTS}/{n}" for n in plots]))
    atomic_write_text(out / directories.REPORT_HTML, render_html(results, plots))
    paths.update({name: out / name for name in (directories.RESULTS, directories.REPORT_MD, directories.REPORT_HTML)})
    return paths
