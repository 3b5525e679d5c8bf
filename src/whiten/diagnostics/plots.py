"""Matplotlib figures of the three instruments (headless Agg backend; matplotlib is the ``bench`` extra)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("plots need matplotlib: pip install 'whiten[bench]' (or pass --no-plots)") from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _grid(count: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, max(1, count))
    return math.ceil(count / cols), cols


def _run_name(run: Mapping[str, Any]) -> str:
    return str(run.get("label", run.get("optimizer", "?")))


def plot_spike_angles(result: Mapping[str, Any], path: str | Path, *, k: int | None = None) -> Path:
    """Angle to the pre-spike basis vs step, one panel per (optimizer, KL init, basis).

    Colour = precision; solid = top-1 angle, dashed = largest top-``k`` angle. ``highest`` is drawn
    first and wider, so where ``high`` coincides with it both stay visible.
    ``result`` is :meth:`whiten.diagnostics.spike.SpikeResult.to_json`'s dict.
    """
    plt = _pyplot()
    runs = result["runs"]
    spike_at = result["config"]["spike_at"]
    topk = k or result["config"]["top_k"]
    panels: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        for basis in run["bases"]:
            panels.setdefault(f"{_run_name(run)} - {basis}", []).append(run)
    order = {"highest": 0, "high": 1, "medium": 2}
    colors = {"highest": "tab:orange", "high": "tab:blue", "medium": "tab:green"}
    rows, cols = _grid(len(panels), 3)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.3 * rows), squeeze=False)
    for ax, (title, members) in zip(axes.flat, panels.items(), strict=False):
        basis = title.rsplit(" - ", 1)[1]
        for run in sorted(members, key=lambda r: order.get(r["precision"], 9)):
            curves = run["bases"][basis]["angles_to_pre"]
            steps = list(range(len(curves["top1"])))
            wide = run["precision"] == "highest"
            color = colors.get(run["precision"])
            ax.plot(steps, curves["top1"], lw=2.2 if wide else 1.0, color=color, label=f"{run['precision']} top-1")
            ax.plot(
                steps,
                curves[f"top{topk}"],
                lw=2.2 if wide else 1.0,
                ls="--",
                color=color,
                label=f"{run['precision']} top-{topk}",
            )
        ax.axvline(spike_at, color="k", lw=0.8, ls=":")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(-3, 93)
        ax.set_yticks([0, 30, 60, 90])
        ax.set_ylabel("angle to Q(spike-1) (deg)", fontsize=8)
        ax.set_xlabel("iteration (0-based)", fontsize=8)
    handles, labels = next(iter(axes.flat)).get_legend_handles_labels()
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(
        f"Eigenbasis rotation around a {result['config']['spike_scale']:g}x gradient spike at iteration "
        f"{spike_at} (dotted); reference = basis at iteration {spike_at - 1}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, plt, path)


def plot_spike_eigenvalues(result: Mapping[str, Any], path: str | Path) -> Path:
    """Largest eigenvalue of ``L`` and the top/2nd ratio vs step, one line per run.

    Colour = optimizer and KL initialisation; solid = ``highest``, dashed = ``high`` (``medium`` dotted).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    names = list(dict.fromkeys(_run_name(r) for r in result["runs"] if r.get("top_eigenvalues")))
    cmap = plt.get_cmap("tab10")
    styles = {"highest": "-", "high": "--", "medium": ":"}
    for run in result["runs"]:
        top = run.get("top_eigenvalues")
        if not top:
            continue
        color = cmap(names.index(_run_name(run)) % 10)
        style = dict(
            lw=1.1, color=color, ls=styles.get(run["precision"], "-"), label=f"{_run_name(run)} ({run['precision']})"
        )
        axes[0].semilogy([t[0] for t in top], **style)
        axes[1].plot([t[0] / t[1] if len(t) > 1 and t[1] > 0 else math.nan for t in top], **style)
    spike_at = result["config"]["spike_at"]
    for ax, title in zip(axes, ("largest eigenvalue of L", "top / 2nd eigenvalue of L"), strict=True):
        ax.axvline(spike_at, color="k", lw=0.8, ls=":")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration (0-based)", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    return _save(fig, plt, path)


def plot_spectra(
    records: Sequence[Mapping[str, Any]], path: str | Path, *, max_panels: int = 12, title: str = ""
) -> Path:
    """Sorted factor spectra per layer/side, one line per training stage, the ranks marked.

    ``records``: snapshots from :func:`whiten.diagnostics.spectra.record_spectra` (or CLI JSON) of ONE
    run. The dashed vertical line is the reporting rank ``r``; the dot on each stage's line is the
    rank ``r(tol)`` the tolerance chooses at that stage (Pro-KLShampoo's adaptive-rank rule).
    """
    plt = _pyplot()
    keys: list[tuple[str, str]] = []
    for rec in records:
        for f in rec["factors"]:
            key = (f["layer"], f["side"])
            if key not in keys:
                keys.append(key)
    keys = keys[:max_panels]
    if not keys:
        raise ValueError("no factor spectra to plot")
    rows, cols = _grid(len(keys), 4)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, key in zip(axes.flat, keys, strict=False):
        rank = None
        for s, rec in enumerate(records):
            for f in rec["factors"]:
                if (f["layer"], f["side"]) != key:
                    continue
                color = cmap(0.9 * s / max(1, len(records) - 1))
                eigs = f["eigenvalues"]
                chosen = f.get("chosen_rank")
                extra = f", r(tol)={chosen}" if chosen is not None else ""
                ax.semilogy(
                    range(1, len(eigs) + 1),
                    eigs,
                    color=color,
                    lw=1.1,
                    label=f"step {rec.get('step')}: AM/GM {f['tail_am_gm']:.3f}{extra}",
                )
                if chosen is not None and 1 <= chosen <= len(eigs):
                    ax.plot([chosen], [eigs[chosen - 1]], "o", color=color, ms=5, mec="k", mew=0.5)
                rank = f["rank"]
        if rank is not None:
            ax.axvline(rank + 0.5, color="r", lw=0.8, ls="--")
        ax.set_title(f"{key[0]} [{key[1]}]  (r = {rank} dashed, AM/GM of the tail after r)", fontsize=8)
        ax.set_xlabel("eigenvalue index (descending)", fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"{title}Kronecker-factor spectra (spike-and-flat: a few large eigenvalues, then a flat tail); "
        "dots: rank chosen by the KL tolerance",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_alpha(runs: Mapping[str, Sequence[Any]], path: str | Path) -> Path:
    """Per-layer alpha of several runs (left) and the mean alpha per module type (right)."""
    from whiten.diagnostics.alpha import mean_by_type

    plt = _pyplot()
    names = list(dict.fromkeys(r.name for layers in runs.values() for r in layers))
    fig, axes = plt.subplots(1, 2, figsize=(max(12, 0.28 * len(names) + 7), 4.6))
    types: list[str] = []
    for label, layers in runs.items():
        axes[0].plot(
            [names.index(r.name) for r in layers], [r.alpha for r in layers], marker="o", ms=3, lw=1, label=label
        )
        for key in mean_by_type(layers):
            if key not in types:
                types.append(key)
    width = 0.8 / max(1, len(runs))
    for i, (label, layers) in enumerate(runs.items()):
        means = mean_by_type(layers)
        xs = [t + i * width for t in range(len(types))]
        axes[1].bar(xs, [means.get(t, {}).get("alpha", math.nan) for t in types], width=width, label=label)
    rules = sorted({r.xmin_rule for layers in runs.values() for r in layers})
    axes[0].set_title(f"power-law alpha per weight matrix (x_min rule: {', '.join(rules)})", fontsize=9)
    axes[0].set_xticks(range(len(names)))
    axes[0].set_xticklabels(names, rotation=60, ha="right", fontsize=6 if len(names) > 12 else 8)
    axes[0].set_ylabel("alpha (lower = heavier tail)", fontsize=8)
    axes[0].legend(fontsize=7)
    axes[1].set_xticks([t + 0.4 - width / 2 for t in range(len(types))])
    axes[1].set_xticklabels(types, rotation=30, ha="right", fontsize=7)
    axes[1].set_title("mean alpha per module type", fontsize=9)
    axes[1].set_ylabel("alpha", fontsize=8)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
