"""Summaries, markdown tables and plots of a results folder.

Targets. With ``targets=None`` the target val losses are the reference loss times each of
``target_factors`` (default 1.10, 1.05, 1.02, 1.00), the reference being AdamW's mean final
validation loss (the worst optimizer's mean final loss when AdamW is not in the comparison).
The factor-1.00 target is "AdamW's final loss".

Time to target. Validation loss is measured every ``eval_every`` steps. A run reaches a target
between the last evaluation above it and the first at or below it; steps, tokens and training
seconds are interpolated linearly in the loss between those two evaluations (``None`` when the
run never reaches the target). Seconds are training-step seconds (evaluation excluded).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from whiten.diagnostics.io import read_json, read_jsonl

PLOT_FILES = ("val_loss_vs_tokens.png", "val_loss_vs_time.png", "time_to_target.png", "memory.png")


def time_to_target(vals: list[dict[str, Any]], target: float) -> dict[str, float] | None:
    """First crossing of ``target`` by the evaluated val loss, interpolated between evaluations."""
    for i, record in enumerate(vals):
        if record["val_loss"] <= target:
            if i == 0:
                return {"step": 0.0, "tokens": 0.0, "seconds": 0.0, "cpu_seconds": 0.0}
            before = vals[i - 1]
            drop = before["val_loss"] - record["val_loss"]
            w = (before["val_loss"] - target) / drop if drop > 0 else 1.0
            keys = [("step", "step"), ("tokens", "tokens"), ("seconds", "time_s"), ("cpu_seconds", "cpu_s")]
            return {
                key: before[src] + w * (record[src] - before[src]) if src in record and src in before else None
                for key, src in keys
            }
    return None


def _stats(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "min": min(finite),
        "max": max(finite),
        "n": len(finite),
    }


def resolve_targets(results: list[dict[str, Any]], targets: list[float] | None, factors: list[float]) -> dict:
    """The target losses and how they were chosen."""
    if targets is not None:
        return {"losses": sorted(targets, reverse=True), "rule": "given by --targets", "reference": None}
    finals: dict[str, list[float]] = {}
    for r in results:
        if math.isfinite(r["final_val_loss"]):
            finals.setdefault(r["label"], []).append(r["final_val_loss"])
    if not finals:
        return {"losses": [], "rule": "no finite final loss", "reference": None}
    if "adamw" in finals:
        reference, name = statistics.fmean(finals["adamw"]), "adamw"
    else:
        name, values = max(finals.items(), key=lambda kv: statistics.fmean(kv[1]))
        reference = statistics.fmean(values)
    losses = [reference * f for f in sorted(factors, reverse=True)]
    return {
        "losses": losses,
        "factors": sorted(factors, reverse=True),
        "reference": reference,
        "rule": f"{name}'s mean final val loss x factors",
    }


def summarize(out: Path, config: dict[str, Any], results: list[dict[str, Any]], extra: dict | None = None) -> dict:
    """Build ``summary.json``'s content from the run results and their logs."""
    targets = resolve_targets(results, config.get("targets"), config["target_factors"])
    runs = []
    for r in results:
        vals = _val_records(out, r["label"], r["seed"])
        run = dict(r)
        missed = {"step": None, "tokens": None, "seconds": None, "cpu_seconds": None}
        run["to_target"] = [{"target": t, **(time_to_target(vals, t) or missed)} for t in targets["losses"]]
        runs.append(run)
    labels = list(dict.fromkeys(r["label"] for r in runs))
    aggregate: dict[str, Any] = {}
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        steps = max(1, mine[0]["steps"])
        entry = {
            "optimizer": mine[0]["optimizer"],
            "lr": mine[0]["lr"],
            "seeds": [r["seed"] for r in mine],
            "diverged": sum(bool(r["diverged"]) for r in mine),
            "final_val_loss": _stats([r["final_val_loss"] for r in mine]),
            "final_train_loss": _stats([r["final_train_loss"] for r in mine]),
            "train_time_s": _stats([r["train_time_s"] for r in mine]),
            "cpu_time_s": _stats([r.get("cpu_time_s") for r in mine]),
            "tokens_per_s": _stats([r["tokens_per_s"] for r in mine]),
            "fwd_bwd_ms_per_step": _stats([1e3 * r["fwd_bwd_time_s"] / max(1, r["steps"]) for r in mine]),
            "optimizer_ms_per_step": _stats([1e3 * r["optimizer_time_s"] / max(1, r["steps"]) for r in mine]),
            "optimizer_state_bytes": _stats([r["optimizer_state_bytes"] for r in mine]),
            "peak_rss_bytes": _stats([r["peak_rss_bytes"] for r in mine]),
            "peak_cuda_bytes": _stats([r.get("peak_cuda_bytes") for r in mine]),  # n = 0 on a CPU run
            "steps": steps,
            "to_target": [],
        }
        for i, target in enumerate(targets["losses"]):
            hits = [r["to_target"][i] for r in mine]
            reached = [h for h in hits if h["seconds"] is not None]
            entry["to_target"].append(
                {
                    "target": target,
                    "reached": f"{len(reached)}/{len(hits)}",
                    # a mean is only meaningful when every seed got there
                    "seconds": _stats([h["seconds"] for h in reached]) if len(reached) == len(hits) else None,
                    "steps": _stats([h["step"] for h in reached]) if len(reached) == len(hits) else None,
                    "cpu_seconds": _stats([h.get("cpu_seconds") for h in reached])
                    if len(reached) == len(hits)
                    else None,
                }
            )
        aggregate[label] = entry
    if "adamw" in aggregate and targets["losses"]:
        last = len(targets["losses"]) - 1
        adamw_time = aggregate["adamw"]["train_time_s"]["mean"]
        adamw_cpu = aggregate["adamw"]["cpu_time_s"]["mean"]
        for entry in aggregate.values():
            hit = entry["to_target"][last]
            seconds = hit["seconds"]["mean"] if hit["seconds"] else None
            cpu = hit["cpu_seconds"]["mean"] if hit["cpu_seconds"] else None
            entry["time_to_adamw_final_s"] = seconds
            # relative to AdamW's whole run: AdamW reaches its own final loss at its end
            entry["time_to_adamw_final_vs_adamw_time"] = seconds / adamw_time if seconds is not None else None
            entry["cpu_time_to_adamw_final_s"] = cpu
            entry["cpu_time_to_adamw_final_vs_adamw"] = cpu / adamw_cpu if cpu is not None and adamw_cpu else None
    summary = {"config": config, "targets": targets, "runs": runs, "aggregate": aggregate, **(extra or {})}
    # imported here so that a plain benchmark never loads the diagnostics
    from whiten.diagnostics.claims_table import has_pro_vs_kl, pro_vs_kl_table

    if has_pro_vs_kl(summary):
        summary["pro_vs_kl"] = pro_vs_kl_table(summary)  # the paper's table shape (docs/diagnostics/claims.md)
    return summary


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown_table(summary: dict[str, Any]) -> str:
    """The results table printed at the end of a bench (and saved as ``results.md``)."""
    agg = summary["aggregate"]
    seeds = max((len(e["seeds"]) for e in agg.values()), default=1)
    spread = " ± std" if seeds > 1 else ""
    lines = [
        f"| optimizer | lr | final val loss{spread} | train s | tok/s | fwd+bwd ms/step | opt ms/step "
        "| opt state MB | peak RSS MB | s to AdamW final | vs AdamW | CPU s to AdamW final | vs AdamW (CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, e in agg.items():
        loss = e["final_val_loss"]
        loss_text = _fmt(loss["mean"], ".4f") + (f" ± {_fmt(loss['std'], '.4f')}" if seeds > 1 else "")
        if e["diverged"]:
            loss_text += f" ({e['diverged']} diverged)"
        to_final = e.get("time_to_adamw_final_s")
        ratio = e.get("time_to_adamw_final_vs_adamw_time")
        lines.append(
            f"| {label} | {e['lr']:g} | {loss_text} | {_fmt(e['train_time_s']['mean'], '.1f')} "
            f"| {_fmt(e['tokens_per_s']['mean'], '.0f')} | {_fmt(e['fwd_bwd_ms_per_step']['mean'], '.1f')} "
            f"| {_fmt(e['optimizer_ms_per_step']['mean'], '.1f')} "
            f"| {_fmt(e['optimizer_state_bytes']['mean'] / 2**20 if e['optimizer_state_bytes']['mean'] else None)} "
            f"| {_fmt(e['peak_rss_bytes']['mean'] / 2**20 if e['peak_rss_bytes']['mean'] else None, '.0f')} "
            f"| {_fmt(to_final, '.1f')} | {_fmt(ratio, '.2f')} "
            f"| {_fmt(e.get('cpu_time_to_adamw_final_s'), '.1f')} "
            f"| {_fmt(e.get('cpu_time_to_adamw_final_vs_adamw'), '.2f')} |"
        )
    targets = summary["targets"]["losses"]
    if targets:
        lines += ["", "Training seconds (and steps) to each target val loss, mean over seeds that all reached it:", ""]
        lines.append("| optimizer | " + " | ".join(f"≤ {t:.4f}" for t in targets) + " |")
        lines.append("|---|" + "---|" * len(targets))
        for label, e in agg.items():
            cells = []
            for hit in e["to_target"]:
                if hit["seconds"] is None:
                    cells.append(f"not reached ({hit['reached']})")
                else:
                    cells.append(f"{hit['seconds']['mean']:.1f} s ({hit['steps']['mean']:.0f})")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if summary.get("pro_vs_kl"):
        from whiten.diagnostics.claims_table import format_pro_vs_kl_table

        lines += ["", format_pro_vs_kl_table(summary["pro_vs_kl"])]
    return "\n".join(lines)


def load_summary(out: Path) -> dict[str, Any]:
    path = out / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist; run `whiten bench --out {out}` first")
    return read_json(path)


def _val_records(out: Path, label: str, seed: int) -> list[dict[str, Any]]:
    """The evaluation records of run ``label``/``seed`` in its ``log.jsonl`` (none yet: ``[]``)."""
    return [x for x in read_jsonl(out / "runs" / f"{label}-s{seed}" / "log.jsonl", missing_ok=True) if "val_loss" in x]


def _curves(
    out: Path, runs: list[dict[str, Any]], label: str, x_key: str
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean, min and max val loss over the seeds of ``label`` on the shared evaluation steps."""
    per_seed = []
    for r in runs:
        if r["label"] != label:
            continue
        vals = _val_records(out, label, r["seed"])
        per_seed.append(vals)
    length = min((len(v) for v in per_seed), default=0)
    xs, mean, lo, hi = [], [], [], []
    for i in range(length):
        points = [v[i] for v in per_seed]
        xs.append(statistics.fmean(p[x_key] for p in points))
        losses = [p["val_loss"] for p in points]
        mean.append(statistics.fmean(losses))
        lo.append(min(losses))
        hi.append(max(losses))
    return xs, mean, lo, hi


def plot(out: Path, summary: dict[str, Any] | None = None) -> list[Path]:
    """Draw the four PNGs of a results folder; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summary if summary is not None else load_summary(out)
    runs, agg = summary["runs"], summary["aggregate"]
    labels = list(agg)
    colors = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(labels)}
    cfg = summary["config"]
    title = f"{cfg['model']}, {cfg['steps']} steps x {cfg['batch_size']}x{cfg['ctx']} tokens, seeds {cfg['seeds']}"
    paths = []
    targets = summary["targets"]["losses"]
    for name, x_key, xlabel in (
        ("val_loss_vs_tokens.png", "tokens", "training tokens"),
        ("val_loss_vs_time.png", "time_s", "training wall-clock (s, eval excluded)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        floor = math.inf
        for label in labels:
            xs, mean, lo, hi = _curves(out, runs, label, x_key)
            if not xs:
                continue
            ax.plot(xs, mean, label=label, color=colors[label])
            if any(a != b for a, b in zip(lo, hi, strict=True)):
                ax.fill_between(xs, lo, hi, color=colors[label], alpha=0.2)
            floor = min(floor, *[m for m in mean if math.isfinite(m)])
        for t in targets:
            ax.axhline(t, color="grey", lw=0.6, ls=":")
        if math.isfinite(floor):
            first = [v for label in labels for v in _curves(out, runs, label, x_key)[1][1:2]]
            top = max([floor + 0.5, *(v for v in first if math.isfinite(v))])
            ax.set_ylim(floor - 0.05, min(top, floor + 2.0))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(1, len(targets))
    for j, target in enumerate(targets):
        heights, xs = [], []
        for i, label in enumerate(labels):
            hit = agg[label]["to_target"][j]["seconds"]
            heights.append(hit["mean"] if hit else 0.0)
            xs.append(i + (j - (len(targets) - 1) / 2) * width)
        bars = ax.bar(xs, heights, width=width, label=f"val ≤ {target:.3f}", alpha=0.85)
        for bar, label in zip(bars, labels, strict=True):
            if agg[label]["to_target"][j]["seconds"] is None:
                ax.text(bar.get_x() + bar.get_width() / 2, 0, "x", ha="center", va="bottom", fontsize=8, color="red")
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax.set_ylabel("training seconds to target (x = not reached)")
    ax.set_title("time to target validation loss", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "time_to_target.png", dpi=110)
    plt.close(fig)
    paths.append(out / "time_to_target.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    state_mb = [(agg[label]["optimizer_state_bytes"]["mean"] or 0) / 2**20 for label in labels]
    rss_mb = [(agg[label]["peak_rss_bytes"]["mean"] or 0) / 2**20 for label in labels]
    axes[0].bar(labels, state_mb, color=[colors[label] for label in labels])
    axes[0].set_ylabel("optimizer state (MiB, exact)")
    axes[1].bar(labels, rss_mb, color=[colors[label] for label in labels])
    axes[1].set_ylabel("peak process RSS (MiB)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("memory", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    plt.close(fig)
    paths.append(out / "memory.png")
    return paths
