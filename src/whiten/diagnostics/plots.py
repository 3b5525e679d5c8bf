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
        raise ModuleNotFoundError(
            "plots need matplotlib: pip install 'whiten[bench]' (or pass --no-plots)"
        ) from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _grid(count: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, max(1, count))
    return math.ceil(count / cols), cols


def plot_spike_angles(result: Mapping[str, Any], path: str | Path, *, k: int | None = None) -> Path:
    """Angle to the pre-spike basis vs step, one panel per (optimizer, basis), one line per precision.

    ``result`` is :meth:`whiten.diagnostics.spike.SpikeResult.to_json`'s dict.
    """
    plt = _pyplot()
    runs = result["runs"]
    spike_at = result["config"]["spike_at"]
    topk = k or result["config"]["top_k"]
    panels: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        for basis in run["bases"]:
            panels.setdefault(f"{run['label']} - {basis}", []).append(run)
    rows, cols = _grid(len(panels), 3)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False, sharex=True)
    for ax, (title, members) in zip(axes.flat, panels.items(), strict=False):
        basis = title.split(" - ", 1)[1]
        for run in members:
            curves = run["bases"][basis]["angles_to_pre"]
            steps = list(range(len(curves["top1"])))
            (line,) = ax.plot(steps, curves["top1"], lw=1.2, label=f"{run['precision']} top-1")
            ax.plot(steps, curves[f"top{topk}"], lw=1.2, ls="--", color=line.get_color(),
                    label=f"{run['precision']} top-{topk}")
        ax.axvline(spike_at, color="k", lw=0.8, ls=":")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(-3, 93)
        ax.set_ylabel("angle to pre-spike basis (deg)", fontsize=8)
        ax.set_xlabel("iteration (0-based)", fontsize=8)
        ax.legend(fontsize=7, loc="center right")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"Eigenbasis rotation around a {result['config']['spike_scale']:g}x gradient spike "
                 f"at iteration {spike_at} (dotted)", fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_spike_eigenvalues(result: Mapping[str, Any], path: str | Path) -> Path:
    """Top/2nd eigenvalue ratio of the left factor vs step, one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for run in result["runs"]:
        top = run.get("top_eigenvalues")
        if not top:
            continue
        label = f"{run['optimizer']} ({run['precision']})"
        axes[0].semilogy([t[0] for t in top], lw=1, label=label)
        axes[1].plot([t[0] / t[1] if t[1] > 0 else math.nan for t in top], lw=1, label=label)
    spike_at = result["config"]["spike_at"]
    for ax, title in zip(axes, ("largest eigenvalue of L", "top / 2nd eigenvalue of L"), strict=True):
        ax.axvline(spike_at, color="k", lw=0.8, ls=":")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration (0-based)", fontsize=8)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_spectra(records: Sequence[Mapping[str, Any]], path: str | Path, *, max_panels: int = 12) -> Path:
    """Sorted factor spectra per layer/side, one line per training stage, the rank r marked.

    ``records``: snapshots from :func:`whiten.diagnostics.spectra.record_spectra` (or CLI JSON).
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
        for s, rec in enumerate(records):
            for f in rec["factors"]:
                if (f["layer"], f["side"]) != key:
                    continue
                color = cmap(s / max(1, len(records) - 1))
                ax.semilogy(range(1, len(f["eigenvalues"]) + 1), f["eigenvalues"], color=color, lw=1.1,
                            label=f"step {rec.get('step')}: AM/GM {f['tail_am_gm']:.3f}")
                rank = f["rank"]
        ax.axvline(rank + 0.5, color="r", lw=0.8, ls="--")
        ax.set_title(f"{key[0]} [{key[1]}]  (r = {rank} dashed)", fontsize=8)
        ax.set_xlabel("eigenvalue index", fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle("Kronecker-factor spectra (spike-and-flat: a few large eigenvalues, then a flat tail)", fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_alpha(runs: Mapping[str, Sequence[Any]], path: str | Path) -> Path:
    """Per-layer alpha of several runs (left) and the mean alpha per module type (right)."""
    from whiten.diagnostics.alpha import mean_by_type

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    types: list[str] = []
    for label, layers in runs.items():
        axes[0].plot(range(len(layers)), [r.alpha for r in layers], marker="o", ms=3, lw=1, label=label)
        for key in mean_by_type(layers):
            if key not in types:
                types.append(key)
    width = 0.8 / max(1, len(runs))
    for i, (label, layers) in enumerate(runs.items()):
        means = mean_by_type(layers)
        xs = [t + i * width for t in range(len(types))]
        axes[1].bar(xs, [means.get(t, {}).get("alpha", math.nan) for t in types], width=width, label=label)
    rule = next(iter(runs.values()))[0].xmin_rule if runs else "?"
    axes[0].set_title(f"power-law alpha per weight matrix (x_min rule: {rule})", fontsize=9)
    axes[0].set_xlabel("layer index (parameter order)", fontsize=8)
    axes[0].set_ylabel("alpha (lower = heavier tail)", fontsize=8)
    axes[0].legend(fontsize=7)
    axes[1].set_xticks([t + 0.4 - width / 2 for t in range(len(types))])
    axes[1].set_xticklabels(types, rotation=30, ha="right", fontsize=7)
    axes[1].set_title("mean alpha per module type", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
