"""The paper's table shape: Pro-KLShampoo at each rank against KL-Shampoo, from a bench ``summary.json``.

Pro-KLShampoo (Wei & Sun, arXiv 2605.06316) is compared with KL-Shampoo per subspace rank on
validation loss, peak memory and wall-clock to each loss level. :func:`pro_vs_kl_table` builds that
table from a bench summary (the ``aggregate`` entries that ``whiten bench`` writes): per rank ``r``
(optimizer label ``pro-kls-rN``), one cell per metric with both sides' ``{"mean", "std", "n"}`` and the
verdict of :func:`whiten.diagnostics.compare.compare` (Pro-KLShampoo against KL-Shampoo; lower is
better for every metric here). The bench writes it into ``summary.json`` (key ``"pro_vs_kl"``) and
``results.md`` whenever a run holds ``kl-shampoo`` and at least one ``pro-kls-rN``; ``whiten diagnose
claims`` reads the same function's output.

Metrics (key, what, kind of noise floor):

* ``final_val_loss`` (loss), ``optimizer_state_bytes`` (exact bytes), ``peak_rss_bytes`` (process peak),
  ``peak_cuda_bytes`` (``torch.cuda.max_memory_allocated``, only where a CUDA run recorded it),
  ``train_time_s`` (wall-clock of the training steps), ``cpu_time_s`` (process CPU seconds);
* per target loss of the bench (``summary["targets"]``): wall-clock seconds, CPU seconds and steps to
  reach it (``None`` when not every seed reached it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from whiten.diagnostics.compare import BETTER, MISSING, NEITHER, NOISE, WORSE, compare

KL_LABEL = "kl-shampoo"
_PRO_LABEL = re.compile(r"^pro-kls-r(\d+)$")

# (key in the aggregate, column title, kind of number)
RUN_METRICS: tuple[tuple[str, str, str], ...] = (
    ("final_val_loss", "final val loss", "loss"),
    ("optimizer_state_bytes", "opt state MiB", "bytes"),
    ("peak_rss_bytes", "peak RSS MiB", "bytes"),
    ("peak_cuda_bytes", "CUDA peak MiB", "bytes"),
    ("train_time_s", "train wall s", "seconds"),
    ("cpu_time_s", "train CPU s", "seconds"),
)
# (key in a to_target entry, title, kind)
TARGET_METRICS: tuple[tuple[str, str, str], ...] = (
    ("seconds", "wall s", "seconds"),
    ("cpu_seconds", "CPU s", "seconds"),
    ("steps", "steps", "steps"),
)
SYMBOLS = {BETTER: "✓", WORSE: "✗", NOISE: "≈", NEITHER: "–", MISSING: "–"}


def pro_ranks(aggregate: Mapping[str, Any]) -> list[tuple[int, str]]:
    """``(rank, label)`` of every ``pro-kls-rN`` run in a summary's aggregate, by rank."""
    found = [(int(m.group(1)), label) for label in aggregate if (m := _PRO_LABEL.match(label))]
    return sorted(found)


def has_pro_vs_kl(summary: Mapping[str, Any]) -> bool:
    agg = summary.get("aggregate", {})
    return KL_LABEL in agg and bool(pro_ranks(agg))


def _stat(entry: Any) -> dict[str, Any] | None:
    """A stats entry reduced to ``{"mean", "std", "n"}``; ``None`` stays ``None`` (target not reached)."""
    if entry is None:
        return None
    return {"mean": entry.get("mean"), "std": entry.get("std"), "n": entry.get("n")}


def _cell(pro: Any, kl: Any, kind: str, *, target: bool = False) -> dict[str, Any]:
    """Both sides and the verdict; ``None`` means "not reached" for a to-target metric, "not recorded" otherwise."""
    unknown = {"mean": None, "std": None, "n": 0}
    pro, kl = _stat(pro), _stat(kl)
    if not target:
        pro, kl = pro or unknown, kl or unknown  # e.g. a summary written before the metric existed
    return {"pro": pro, "kl": kl, "kind": kind, "verdict": compare(pro, kl, kind)}


def pro_vs_kl_table(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Per rank, Pro-KLShampoo vs KL-Shampoo on every metric of the module doc, with verdicts."""
    agg = summary["aggregate"]
    if KL_LABEL not in agg:
        raise ValueError(f"the summary has no {KL_LABEL!r} run; the table compares pro-kls-rN against it")
    ranks = pro_ranks(agg)
    if not ranks:
        raise ValueError("the summary has no pro-kls-rN run; the table compares them against kl-shampoo")
    kl = agg[KL_LABEL]
    targets = list(summary.get("targets", {}).get("losses", []))
    rows = []
    for rank, label in ranks:
        pro = agg[label]
        cells = {key: _cell(pro.get(key), kl.get(key), kind) for key, _, kind in RUN_METRICS}
        to_target = []
        for i, target in enumerate(targets):
            p_hit, k_hit = pro["to_target"][i], kl["to_target"][i]
            entry: dict[str, Any] = {
                "target": target,
                "reached": {"pro": p_hit["reached"], "kl": k_hit["reached"]},
            }
            for key, _, kind in TARGET_METRICS:
                entry[key] = _cell(p_hit.get(key), k_hit.get(key), kind, target=True)
            to_target.append(entry)
        rows.append({"rank": rank, "label": label, "cells": cells, "to_target": to_target})
    return {"baseline": KL_LABEL, "targets": targets, "rows": rows}


def claim_cells(table: Mapping[str, Any]) -> list[str]:
    """The verdicts the paper's claim is about: final val loss, peak memory, wall-clock to each target.

    Peak memory is the CUDA peak where it was recorded, else the process peak RSS.
    """
    out = []
    for row in table["rows"]:
        cells = row["cells"]
        out.append(cells["final_val_loss"]["verdict"])
        cuda = cells["peak_cuda_bytes"]["verdict"]
        out.append(cuda if cuda != MISSING else cells["peak_rss_bytes"]["verdict"])
        out += [hit["seconds"]["verdict"] for hit in row["to_target"]]
    return out


def _num(stat: Mapping[str, Any] | None, kind: str, key: str) -> str:
    if stat is None:
        return "not reached"
    mean, std = stat.get("mean"), stat.get("std")
    if mean is None:
        return "-"
    if key.endswith("bytes"):
        return f"{mean / 2**20:.3f}"
    spec = ".4f" if kind == "loss" else (".0f" if kind == "steps" else ".1f")
    text = format(mean, spec)
    if std and (stat.get("n") or 0) > 1:
        text += f" ± {format(std, spec)}"
    return text


def format_cell(cell: Mapping[str, Any], key: str) -> str:
    """``pro vs kl verdict-symbol`` for one metric."""
    return (
        f"{_num(cell['pro'], cell['kind'], key)} vs {_num(cell['kl'], cell['kind'], key)} "
        f"{SYMBOLS.get(cell['verdict'], '?')}"
    )


def format_pro_vs_kl_table(table: Mapping[str, Any]) -> str:
    """Markdown: one row per rank; ``Pro vs KL`` per cell with ✓ better, ✗ worse, ≈ within noise."""
    rows = table["rows"]
    has_cuda = any(r["cells"]["peak_cuda_bytes"]["pro"] and r["cells"]["peak_cuda_bytes"]["pro"]["mean"] for r in rows)
    metrics = [m for m in RUN_METRICS if has_cuda or m[0] != "peak_cuda_bytes"]
    head = ["rank"] + [title for _, title, _ in metrics]
    lines = [
        "Pro-KLShampoo rN vs KL-Shampoo (mean ± std over seeds; ✓ better, ✗ worse, ≈ within noise, "
        "rule in `whiten.diagnostics.compare`):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        cells = [format_cell(row["cells"][key], key) for key, _, _ in metrics]
        lines.append(f"| r={row['rank']} | " + " | ".join(cells) + " |")
    if table["targets"]:
        head = ["rank", "target", "reached (pro / kl)"] + [title for _, title, _ in TARGET_METRICS]
        lines += ["", "To each target val loss:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in rows:
            for hit in row["to_target"]:
                cells = [format_cell(hit[key], key) for key, _, _ in TARGET_METRICS]
                lines.append(
                    f"| r={row['rank']} | ≤ {hit['target']:.4f} | {hit['reached']['pro']} / {hit['reached']['kl']} | "
                    + " | ".join(cells)
                    + " |"
                )
    return "\n".join(lines)
