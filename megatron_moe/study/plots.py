"""The report's plots, as PNG bytes by file name (matplotlib, imported only here; none without it).

Every band and error bar is the same Student-t interval over seeds that the tables give (`stats.summarize` at
the report's confidence), never min..max or ± std, so a plot and a table of one quantity agree.

- loss_curves.png: validation and training loss, each seed a thin line under the mean over seeds and its t band;
  the bottom row zooms on the last half of training (x from half the longest run to its end, y fitted to what is
  drawn there), where the arms differ by less than the early-training drop that sets the top row's scale.
- loss_vs_compute.png: validation loss against training compute (tokens x the arm's training FLOPs per token),
  where an arm that costs more per token is charged for it.
- expert_load.png (studies with MoE arms): each MoE layer's load imbalance (max / mean tokens per expert at the
  logged step, 1 = uniform) over training, mean over seeds, one panel per MoE arm.
- gaps.png: the paired gap at every evaluation step both arms reached, mean with its t band.
- gap_intervals.png: the final paired gaps (best validation loss), one row per comparison: per-seed gaps,
  mean and t interval, and the zero line (no difference).
- best_val_loss.png: best validation loss per arm: seeds as dots, mean with its t interval.
- er_loss_vs_ra.png (equal-resources studies): best validation loss and bits/byte against r_a on a log axis,
  seeds as dots, means with their t intervals, the dense arm as a horizontal band (its t interval), and on the
  loss panel the fitted quadratic in log r_a with r_a* and its seed-bootstrap interval.
- er_tokens.png (equal-resources studies): consumed and unique tokens, and epochs, against 1/r_a (the dense
  arm at 1).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from megatron_moe.study.stats import TOO_FEW, summarize

if TYPE_CHECKING:
    from megatron_moe.study.records import RunData, StudyRecord, StudyResults


def _band(values: list[float], confidence: float) -> tuple[float, float | None, float | None]:
    """Mean and t interval of one step's values over seeds (no interval for too few seeds)."""
    st = summarize(values, confidence)
    return st.mean, st.ci_low, st.ci_high


def _zoom(ax: Any, drawn: list[tuple[list[float], list[float], list[float]]]) -> None:
    """Limit `ax` to the last half of training: x from half the largest x drawn, y to what is drawn there."""
    xmax = max((x[-1] for x, _, _ in drawn if x), default=None)
    if xmax is None:
        return
    lo_x = xmax / 2
    ys = [y for x, low, high in drawn for xi, *yi in zip(x, low, high) if xi >= lo_x for y in yi]
    ax.set_xlim(lo_x, xmax * 1.01)
    if ys:
        lo, hi = min(ys), max(ys)
        pad = 0.08 * (hi - lo) or 0.01 * max(abs(hi), 1e-6)
        ax.set_ylim(lo - pad, hi + pad)


def make_plots(results: StudyResults, record: StudyRecord, runs: list[RunData]) -> dict[str, bytes]:
    """PNG bytes by file name (see the module docstring); {} without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    conf = results.confidence
    band = f"{100 * conf:g}% t interval over seeds"
    # x axis: training tokens; for an equal-resources family training compute, where every arm ends at C
    if record.family:
        tps = {a.name: a.tokens_per_step * a.match["flops_per_token"] for a in record.arms}
        xlabel = f"training FLOPs ({record.family['flops']} convention)"
    else:
        tps = {a.name: a.tokens_per_step for a in record.arms}
        xlabel = "training tokens"
    arm_names = [a.name for a in record.arms]
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(arm_names)}
    out: dict[str, bytes] = {}

    def png(fig: Any) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    def curves(ax: Any, key: str, rows_of: str, per_step: dict[str, float] | None = None,
               label: str | None = None) -> list[tuple[list[float], list[float], list[float]]]:
        """Each seed thin, then the mean over seeds with its t band, per arm, against steps x `per_step` (default:
        the x axis of the study); returns (x, low, high) of what it drew, for zooming."""
        per_step = per_step or tps
        drawn = []
        for arm in arm_names:
            mine = [r for r in runs if r.arm == arm and r.complete]
            series = [{row["step"]: row[key] for row in getattr(r, rows_of) if key in row} for r in mine]
            if not series:
                continue
            steps = sorted(set.intersection(*(set(s) for s in series)))
            if not steps:
                continue
            x = [s * per_step[arm] for s in steps]
            for s in series:
                ax.plot([t * per_step[arm] for t in sorted(s)], [s[t] for t in sorted(s)], color=colors[arm],
                        linewidth=0.6, alpha=0.35)
            stats = [_band([s[t] for s in series], conf) for t in steps]
            mean = [m for m, _, _ in stats]
            ax.plot(x, mean, label=f"{arm} (n={len(series)})", color=colors[arm],
                    marker="o" if rows_of == "evals" else None, markersize=3)
            low, high = mean, mean
            if all(lo is not None for _, lo, _ in stats):  # no band below MIN_SEEDS_FOR_INTERVAL seeds
                low, high = [lo for _, lo, _ in stats], [hi for _, _, hi in stats]
                ax.fill_between(x, low, high, color=colors[arm], alpha=0.2, linewidth=0)
            drawn.append((x, low, high))
        ax.set_xlabel(label or xlabel)
        ax.grid(alpha=0.3)
        return drawn

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (key, rows_of, what) in enumerate((("val_loss", "evals", "validation loss"),
                                                ("loss", "train", "training loss"))):
        full, zoom = axes[0][col], axes[1][col]
        curves(full, key, rows_of)
        _zoom(zoom, curves(zoom, key, rows_of))
        full.set_title(f"{what} (thin: seeds; thick: mean; band: {band})", fontsize=9)
        zoom.set_title(f"{what}, last half of training (zoomed)", fontsize=9)
        for ax in (full, zoom):
            ax.set_ylabel(f"{what} (nats/token)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    out["loss_curves.png"] = png(fig)

    flops = {a.name: a.tokens_per_step * a.match.get("flops_per_token", a.flops_train_per_token)
             for a in record.arms}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves(ax, "val_loss", "evals", flops, "training compute (FLOPs)")
    ax.set_xscale("log")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"validation loss against training compute (thin: seeds; band: {band})", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    out["loss_vs_compute.png"] = png(fig)

    moe_arms = [a.name for a in record.arms if a.is_moe]
    loads = {arm: [r for r in runs if r.arm == arm and r.complete and any("layer_imbalance" in t for t in r.train)]
             for arm in moe_arms}
    if any(loads.values()):
        shown = [arm for arm in moe_arms if loads[arm]]
        fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3.8), squeeze=False)
        for ax, arm in zip(axes[0], shown):
            series = [{t["step"]: t["layer_imbalance"] for t in r.train if "layer_imbalance" in t} for r in loads[arm]]
            steps = sorted(set.intersection(*(set(s) for s in series)))
            for layer in range(len(series[0][steps[0]]) if steps else 0):
                ax.plot([t * tps[arm] for t in steps], [sum(s[t][layer] for s in series) / len(series) for t in steps],
                        linewidth=1, label=f"MoE layer {layer + 1}")
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("max / mean tokens per expert")
            ax.set_title(f"{arm}: load imbalance per layer (mean of {len(series)} seeds; 1 = uniform)", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        out["expert_load.png"] = png(fig)

    if any(g["over_training"] for g in results.gaps):
        fig, ax = plt.subplots(figsize=(7, 4))
        for g in results.gaps:
            pts = [p for p in g["over_training"] if p["mean"] is not None]
            if not pts:
                continue
            x = [p["tokens"] if p["tokens"] is not None else p["step"] for p in pts]
            line = ax.plot(x, [p["mean"] for p in pts], marker="o", markersize=3, label=g["name"])[0]
            if all(p["ci"][0] is not None for p in pts):
                ax.fill_between(x, [p["ci"][0] for p in pts], [p["ci"][1] for p in pts],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("val loss(baseline) - val loss(MoE) (nats/token)")
        ax.set_title(f"paired gap over training (mean; band: {band}; > 0: MoE better)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out["gaps.png"] = png(fig)

    gaps = [g for g in results.gaps if g["mean"] is not None]
    if gaps:
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.6 * len(gaps)))
        for i, g in enumerate(gaps):
            y = len(gaps) - 1 - i  # the first comparison on top, as in the table
            ax.scatter(list(g["per_seed"].values()), [y] * len(g["per_seed"]), color="gray", alpha=0.6, s=14,
                       label="seeds" if i == 0 else None, zorder=2)
            lo, hi = g["ci"]
            if lo is not None:
                ax.errorbar([g["mean"]], [y], xerr=[[g["mean"] - lo], [hi - g["mean"]]], fmt="D", color="C0",
                            capsize=4, label=f"mean, {100 * conf:g}% t interval" if i == 0 else None, zorder=3)
            else:
                ax.scatter([g["mean"]], [y], marker="D", color="C0", label=f"mean ({TOO_FEW})" if i == 0 else None)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(gaps)), [g["name"] for g in reversed(gaps)])
        ax.set_ylim(-0.7, len(gaps) - 0.3)
        ax.set_xlabel("best val loss(baseline) - best val loss(MoE), nats/token  (> 0: MoE better)")
        ax.set_title(f"final paired gaps ({band})", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=8, loc="best")
        out["gap_intervals.png"] = png(fig)

    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(arm_names)), 4))
    for i, a in enumerate(results.arms):
        vals = list(a["best_val_loss"]["per_seed"].values())
        ax.scatter([i] * len(vals), vals, color=colors[a["arm"]], alpha=0.6, s=18)
        st = a["best_val_loss"]
        if st["mean"] is not None:
            lo, hi = st["ci"]
            yerr = [[0.0], [0.0]] if lo is None else [[st["mean"] - lo], [hi - st["mean"]]]
            ax.errorbar([i + 0.15], [st["mean"]], yerr=yerr, fmt="D", color=colors[a["arm"]], capsize=4)
    ax.set_xticks(range(len(arm_names)), arm_names, rotation=20, ha="right")
    ax.set_ylabel("best validation loss (nats/token)")
    ax.set_title(f"best validation loss per arm (dots: seeds; diamond: mean, bar: {band})", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    out["best_val_loss.png"] = png(fig)
    if results.equal_resources:
        out.update(_er_plots(results.equal_resources, plt, png, band))
    return out


def _er_plots(er: dict[str, Any], plt: Any, png: Any, band: str) -> dict[str, bytes]:
    """er_loss_vs_ra.png and er_tokens.png (see the module docstring) from results.json's equal_resources."""
    import math

    out: dict[str, bytes] = {}
    moe = sorted((x for x in er["arms"] if x["is_moe"]), key=lambda x: x["r_a"])
    dense = next((x for x in er["arms"] if not x["is_moe"]), None)
    fit = er["fit"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, what in ((axes[0], "best_val_loss", "best validation loss (nats/token)"),
                          (axes[1], "best_val_bpb", "bits/byte at the best evaluation")):
        for i, x in enumerate(moe):
            vals = list(x[key]["per_seed"].values())
            ax.scatter([x["r_a"]] * len(vals), vals, color="gray", alpha=0.6, s=14, zorder=2,
                       label="seeds" if i == 0 else None)
        pts = [x for x in moe if x[key]["mean"] is not None]
        if pts:
            means = [x[key]["mean"] for x in pts]
            has_ci = [x for x in pts if x[key]["ci"][0] is not None]
            ax.plot([x["r_a"] for x in pts], means, "D", color="C0", zorder=3, label="MoE mean")
            if has_ci:
                ax.errorbar([x["r_a"] for x in has_ci], [x[key]["mean"] for x in has_ci],
                            yerr=[[x[key]["mean"] - x[key]["ci"][0] for x in has_ci],
                                  [x[key]["ci"][1] - x[key]["mean"] for x in has_ci]],
                            fmt="none", ecolor="C0", capsize=4, zorder=3, label=band)
        if dense is not None and dense[key]["mean"] is not None:
            lo, hi = dense[key]["ci"]
            ax.axhline(dense[key]["mean"], color="C3", linewidth=1, label=f"dense ({dense['arm']}) mean")
            if lo is not None:
                ax.axhspan(lo, hi, color="C3", alpha=0.15, linewidth=0, label="dense t interval")
        if key == "best_val_loss" and fit is not None:
            c0, c1, c2 = fit["coeffs"]
            xs = [fit["x_min"] * (fit["x_max"] / fit["x_min"]) ** (i / 100) for i in range(101)]
            ys = [c0 + c1 * math.log(v / fit["x_ref"]) + c2 * math.log(v / fit["x_ref"]) ** 2 for v in xs]
            ax.plot(xs, ys, color="C2", linewidth=1.2, label="quadratic in log r_a (through the means)")
            ax.axvline(fit["x_opt"], color="C2", linestyle="--", linewidth=1,
                       label=f"r_a* = {fit['x_opt']:.3g}" + (" (grid edge)" if fit["at_edge"] else ""))
            if fit["ci"][0] is not None:
                ax.axvspan(fit["ci"][0], fit["ci"][1], color="C2", alpha=0.12, linewidth=0,
                           label="r_a* seed-bootstrap interval")
        ax.set_xscale("log")
        if moe:  # plain labels at the arms' rates, not powers of ten
            ax.set_xticks([x["r_a"] for x in moe], [f"{x['r_a']:.3g}" for x in moe])
            ax.minorticks_off()
        ax.set_xlabel("activation rate r_a = N_a / N (log scale)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0].set_title(f"equal N, C, D ({er['reuse']} reuse): loss against r_a", fontsize=9)
    axes[1].set_title("bits/byte against r_a", fontsize=9)
    fig.tight_layout()
    out["er_loss_vs_ra.png"] = png(fig)

    arms = sorted(er["arms"], key=lambda x: x["inv_r_a"])
    fig, ax = plt.subplots(figsize=(7, 4))
    inv = [x["inv_r_a"] for x in arms]
    ax.plot(inv, [x["consumed_tokens"] for x in arms], "o-", color="C0", label="consumed tokens")
    ax.plot(inv, [x["unique_tokens"] for x in arms], "s--", color="C1", label="unique tokens read")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(inv, [f"{v:.3g}" for v in inv])
    ax.minorticks_off()
    ax.set_xlabel("1 / r_a (log scale; dense = 1)")
    ax.set_ylabel("tokens")
    ax.grid(alpha=0.3, which="both")
    right = ax.twinx()
    right.plot(inv, [x["epochs"] or 0 for x in arms], "^:", color="C2", label="epochs (consumed / unique)")
    right.set_ylabel("epochs")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
    for x in arms:
        ax.annotate(x["arm"].removeprefix("er_"), (x["inv_r_a"], x["consumed_tokens"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 4))
    ax.set_title(f"tokens at equal compute against 1/r_a ({er['reuse']} reuse)", fontsize=9)
    out["er_tokens.png"] = png(fig)
    return out
