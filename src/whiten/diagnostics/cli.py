"""``whiten diagnose {spike, spectra, alpha, claims}``: the instruments and the claims page on the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from whiten.diagnostics.alpha import XMIN_RULES, LayerAlpha, format_alpha_table, mean_by_type, weight_alpha
from whiten.diagnostics.io import (
    checkpoint_step,
    find_model_state,
    labelled_sources,
    load_checkpoint,
    read_json,
    read_jsonl,
)
from whiten.diagnostics.spectra import (
    FACTOR_SOURCES,
    expected_factors,
    factor_spectra,
    format_spectra_table,
    spectrum_stats,
)
from whiten.diagnostics.spike import KL_INIT_CHOICES, SpikeConfig, run_spike_experiment, spike_names
from whiten.linalg import PRECISIONS
from whiten.optim.registry import parse_options


def _csv(kind: type = str):
    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {text!r}") from err

    return parse


def _shape(text: str) -> tuple[int, int]:
    parts = _csv(int)(text.replace("x", ","))
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected a shape like 128x64, got {text!r}")
    return parts  # type: ignore[return-value]


def register(subparsers: argparse._SubParsersAction) -> None:
    diagnose = subparsers.add_parser(
        "diagnose", help="diagnostics: spike rotation, factor spectra, weight alpha, the claims page"
    )
    inner = diagnose.add_subparsers(dest="instrument", metavar="INSTRUMENT")
    diagnose.set_defaults(func=lambda args: (diagnose.print_help(), 2)[1])

    spike = inner.add_parser(
        "spike",
        help="eigenbasis rotation around a gradient spike (docs/diagnostics/spike.md)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = SpikeConfig()
    spike.add_argument("--shape", type=_shape, default=d.shape, help="parameter shape MxN")
    spike.add_argument("--seed", type=int, default=d.seed)
    spike.add_argument("--spike-at", type=int, default=d.spike_at, help="0-based iteration of the spike")
    spike.add_argument("--spike-scale", type=float, default=d.spike_scale)
    spike.add_argument("--steps", type=int, default=d.steps)
    spike.add_argument(
        "--optimizers",
        type=_csv(),
        default=d.optimizers,
        help=f"comma list of {', '.join(spike_names())}, pro-kls-rN (Pro-KLShampoo at rank N)",
    )
    spike.add_argument("--precisions", type=_csv(), default=d.precisions, help=f"comma list of {PRECISIONS}")
    spike.add_argument(
        "--kl-init",
        type=_csv(),
        default=d.kl_inits,
        help=f"comma list of {KL_INIT_CHOICES} (SOAP/REKLS); 'safe,peer' shows both",
    )
    spike.add_argument("--top-k", type=int, default=d.top_k)
    spike.add_argument("--offsets", type=_csv(int), default=d.offsets)
    spike.add_argument(
        "--option",
        dest="option_items",
        action="append",
        help="extra constructor option OPTIMIZER.KEY=VALUE (repeatable), e.g. pro-kls-r16.init_factor=0.5",
    )
    spike.add_argument(
        "--precondition-frequency",
        type=int,
        default=d.precondition_frequency,
        help="KL-Shampoo / Pro-KLShampoo basis refresh interval",
    )
    spike.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda uses real TF32; cpu emulates it"
    )
    spike.add_argument("--threads", type=int, default=1, help="torch CPU threads (small matrices: 1 is fastest)")
    spike.add_argument("--out", type=Path, help="write spike.json and PNGs here")
    spike.add_argument("--no-plots", action="store_true")
    spike.set_defaults(func=cmd_spike)

    spectra = _instrument(
        inner,
        "spectra",
        "spike-and-flat spectra of Kronecker factors from checkpoints",
        "optimizer state_dicts / checkpoints (one per training stage; Lightning .ckpt included), a bench "
        "diagnostics.jsonl or JSON list of record_spectra snapshots, a bench run or results folder "
        "(whiten bench --record-every N), or a Hugging Face Trainer checkpoint-N folder or output_dir; "
        "LABEL=PATH names the run",
        "write spectra.json and spectra.png (several runs: spectra_RUN.png each) here",
    )
    spectra.add_argument("--rank", type=int, default=16, help="r at which energy, AM/GM and KL gap are reported")
    spectra.add_argument(
        "--tol",
        type=float,
        default=0.5,
        help="KL tolerance (nats per column, Pro-KLShampoo's rank_tolerance) for the chosen rank",
    )
    spectra.add_argument(
        "--use",
        choices=FACTOR_SOURCES,
        default="factor",
        help="'factor': eigenvalues of stored L/R; 'lam': KL-Shampoo's EMA eigenvalues",
    )
    spectra.add_argument("--max-panels", type=int, default=12)
    spectra.set_defaults(func=cmd_spectra)

    alpha = _instrument(
        inner,
        "alpha",
        "power-law alpha of weight-matrix ESDs (HT-SR)",
        "model state_dicts / checkpoints (Lightning .ckpt included), bench diagnostics.jsonl, a bench run or "
        "results folder (one run per run folder), or a Hugging Face Trainer checkpoint-N folder or output_dir; "
        "LABEL=PATH names a run (e.g. muon=runs/muon/ckpt.pt; a path that exists is never split at '=')",
        "write alpha.json and alpha.png here",
    )
    alpha.add_argument("--xmin", choices=XMIN_RULES, default="ks", help="x_min rule: KS minimiser or median")
    alpha.add_argument("--min-tail", type=int, default=10)
    alpha.add_argument("--include", type=_csv(), help="only parameters whose name contains one of these")
    alpha.set_defaults(func=cmd_alpha)

    claims = inner.add_parser(
        "claims",
        help="the seed papers' six claims settled by a claims bench run (docs/diagnostics/claims.md)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    claims.add_argument(
        "results_dir",
        type=Path,
        help="folder holding the bench folders of both families (whiten bench --preset claims / claims-llama), "
        "their sweeps, optionally a `whiten diagnose spike` output and kl_shampoo_investigation.md",
    )
    claims.add_argument("--out", type=Path, default=Path("docs/claims.md"), help="the markdown page to write")
    claims.add_argument(
        "--figures", type=Path, help="folder of the PNGs and claims.json (default: OUT's folder/img/claims)"
    )
    claims.set_defaults(func=cmd_claims)


def _instrument(
    inner: argparse._SubParsersAction, name: str, summary: str, inputs: str, out: str
) -> argparse.ArgumentParser:
    """A checkpoint-reading instrument: its input paths, --trusted, --out and --no-plots."""
    parser = inner.add_parser(name, help=summary, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("inputs", nargs="+", help=inputs)
    parser.add_argument("--trusted", action="store_true", help="allow pickled objects (torch.load weights_only=False)")
    parser.add_argument("--out", type=Path, help=out)
    parser.add_argument("--no-plots", action="store_true")
    return parser


def _write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def cmd_spike(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {str(args.out)!r} is a file, not a folder")
    torch.set_num_threads(args.threads)
    config = SpikeConfig(
        shape=args.shape,
        seed=args.seed,
        spike_at=args.spike_at,
        spike_scale=args.spike_scale,
        steps=args.steps,
        optimizers=args.optimizers,
        precisions=args.precisions,
        kl_inits=args.kl_init,
        top_k=args.top_k,
        offsets=args.offsets,
        options=parse_options(args.option_items or []),
        precondition_frequency=args.precondition_frequency,
        device=args.device,
    )
    result = run_spike_experiment(config, progress=lambda line: print(line, flush=True))
    data = result.to_json()
    print(result.format_tables())
    if args.out:
        _write_json(data, args.out / "spike.json")
        if not args.no_plots:
            from whiten.diagnostics.plots import plot_spike_angles, plot_spike_eigenvalues

            plot_spike_angles(data, args.out / "spike_angles.png")
            plot_spike_eigenvalues(data, args.out / "spike_eigenvalues.png")
        print(f"wrote {args.out}/spike.json" + ("" if args.no_plots else " and PNGs"))
    return 0


class NoFactorsError(ValueError):
    """A run that holds no Kronecker factors (Muon, AdamW): skipped inside a results folder."""


def _spectra_records(path: Path, args: argparse.Namespace, run: str) -> list[dict[str, Any]]:
    if path.suffix in (".json", ".jsonl"):
        items = read_jsonl(path) if path.suffix == ".jsonl" else read_json(path)
        items = items if isinstance(items, list) else [items]
        records = []
        for item in items:
            rec = item.get("record_spectra", item) if isinstance(item, dict) else None
            if isinstance(rec, dict) and rec.get("factors"):
                # the bench hook stores the step next to the snapshot, not inside it
                step = rec.get("step") if rec.get("step") is not None else item.get("step")
                factors = [_restat(f, args.rank, args.tol) for f in rec["factors"]]
                records.append(
                    {
                        **rec,
                        "step": step,
                        "rank": args.rank,
                        "tol": args.tol,
                        "run": run,
                        "source": str(path),
                        "factors": factors,
                    }
                )
        if not records:
            raise NoFactorsError(
                f"{str(path)!r} holds no record_spectra snapshots with factors (entries with "
                "'factors'; an optimizer without Kronecker factors, e.g. Muon or AdamW, records none)"
            )
        return records
    checkpoint = load_checkpoint(path, trusted=args.trusted)
    step = checkpoint_step(path, checkpoint)
    factors = factor_spectra(checkpoint, rank=args.rank, tol=args.tol, use=args.use, allow_empty=True)
    if not factors:
        raise NoFactorsError(
            f"{str(path)!r} holds no Kronecker factor ({expected_factors()}); was the optimizer stepped?"
        )
    return [
        {
            "step": step if step is not None else path.stem,
            "rank": args.rank,
            "tol": args.tol,
            "run": run,
            "source": str(path),
            "factors": [f.as_dict() for f in factors],
        }
    ]


def _restat(factor: dict[str, Any], rank: int, tol: float | None) -> dict[str, Any]:
    """A recorded factor's statistics recomputed from its stored eigenvalues at ``--rank`` / ``--tol``."""
    bound = factor.get("max_rank") or factor["dim"]
    eigs = torch.tensor(factor["eigenvalues"], dtype=torch.float64)
    return {**factor, "tol": tol, "max_rank": bound, **spectrum_stats(eigs, factor["other_dim"], rank, tol, bound)}


def _file_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def cmd_spectra(args: argparse.Namespace) -> int:
    if args.rank < 0:
        raise ValueError(f"--rank must be >= 0, got {args.rank}")
    if args.max_panels < 1:
        raise ValueError(f"--max-panels must be >= 1, got {args.max_panels}")
    if not args.tol >= 0:
        raise ValueError(f"--tol must be >= 0 (nats per column of the other side), got {args.tol}")
    records: list[dict[str, Any]] = []
    for item in args.inputs:
        sources = labelled_sources(item, "optimizer")
        for run, path in sources:
            try:
                records += _spectra_records(path, args, run)
            except NoFactorsError as err:
                if len(sources) == 1:
                    raise
                print(f"skipping run {run}: {err}")  # a results folder also holds Muon/AdamW runs
    if not records:
        raise ValueError(f"none of {[str(p) for p in args.inputs]} holds Kronecker-factor spectra")
    runs = list(dict.fromkeys(rec["run"] for rec in records))
    for rec in records:
        print(f"\n== run {rec['run']}, stage: step {rec.get('step')} ({rec.get('source', 'record')})")
        print(format_spectra_table(rec["factors"]))
    if args.out:
        _write_json(records, args.out / "spectra.json")
        written = []
        if not args.no_plots:
            from whiten.diagnostics.plots import plot_spectra

            for run in runs:
                # one figure per run: the panels are (layer, side), the lines training stages
                name = "spectra.png" if len(runs) == 1 else f"spectra_{_file_name(run)}.png"
                title = f"run {run}: " if len(runs) > 1 else ""
                plot_spectra(
                    [r for r in records if r["run"] == run], args.out / name, max_panels=args.max_panels, title=title
                )
                written.append(name)
        print(f"\nwrote {args.out}/spectra.json" + (f" and {', '.join(written)}" if written else ""))
    return 0


def cmd_claims(args: argparse.Namespace) -> int:
    from whiten.diagnostics.claims import build_page

    torch.set_num_threads(1)  # small matrices: one thread is fastest and reproducible
    page = build_page(args.results_dir, args.out, args.figures)
    for claim in page["claims"]:
        print(f"claim {claim['number']}: {claim['verdict']:<17} {claim['evidence']}")
    for note in page["notes"]:
        print(note)
    print(f"wrote {page['page']} and {len(page['figures'])} figures")
    return 0


def _alpha_from_jsonl(path: Path) -> list[LayerAlpha]:
    entries = read_jsonl(path)
    lists = [e["weight_alpha"] for e in entries if isinstance(e.get("weight_alpha"), list) and e["weight_alpha"]]
    if not lists:
        raise ValueError(f"{str(path)!r} holds no weight_alpha records")
    return [LayerAlpha(**{**d, "shape": tuple(d["shape"])}) for d in lists[-1]]


def cmd_alpha(args: argparse.Namespace) -> int:
    runs: dict[str, list[LayerAlpha]] = {}
    for item in args.inputs:
        for name, path in labelled_sources(item, "model"):
            if path.suffix == ".jsonl":
                layers = _alpha_from_jsonl(path)
                if layers[0].xmin_rule != args.xmin:
                    raise ValueError(
                        f"{str(path)!r} was recorded with the x_min rule {layers[0].xmin_rule!r}, not --xmin "
                        f"{args.xmin}; pass --xmin {layers[0].xmin_rule} (runs compare only under one rule) or "
                        "use a checkpoint"
                    )
            else:
                state = find_model_state(load_checkpoint(path, trusted=args.trusted), origin=str(path))
                layers = weight_alpha(state, args.xmin, min_tail=args.min_tail, include=args.include)
            if name in runs:
                name = f"{name}#{len(runs)}"
            runs[name] = layers
    out: dict[str, Any] = {}
    for label, layers in runs.items():
        print(f"\n== {label}  (x_min rule: {layers[0].xmin_rule})")
        print(format_alpha_table(layers))
        means = mean_by_type(layers)
        print("\nmean per module type:")
        for key, m in means.items():
            print(
                f"  {key:<24} n={m['count']:<3} alpha={m['alpha']:.3f}  stable_rank={m['stable_rank']:.2f}  "
                f"||W||2={m['spectral_norm']:.3f}"
            )
        out[label] = {"layers": [r.as_dict() for r in layers], "mean_by_type": means}
    if args.out:
        _write_json(out, args.out / "alpha.json")
        if not args.no_plots:
            from whiten.diagnostics.plots import plot_alpha

            plot_alpha(runs, args.out / "alpha.png")
        print(f"\nwrote {args.out}/alpha.json" + ("" if args.no_plots else " and alpha.png"))
    return 0
