"""Produce the example figures of docs/diagnostics/ (spectra and alpha; the spike figures come from the CLI).

    .venv/bin/python docs/diagnostics/make_figures.py --out results/diag-figures

A small MLP (64 -> 256 -> 256 -> 32) learns a random low-rank teacher with label noise on CPU:
* KL-Shampoo checkpoints at several steps (torch.save'd {"model", "optimizer", "step"}) feed
  ``whiten diagnose spectra``;
* the same student trained with Muon and with HTMuon (same data, seed and steps) feeds
  ``whiten diagnose alpha``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import whiten


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 32))


def batches(steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    teacher_in = torch.randn(64, 8, generator=gen)  # rank-8 teacher: a spike of 8 directions
    teacher_out = torch.randn(8, 32, generator=gen)
    for _ in range(steps):
        x = torch.randn(256, 64, generator=gen)
        y = torch.tanh(x @ teacher_in) @ teacher_out + 0.3 * torch.randn(256, 32, generator=gen)
        yield x, y


def train(optimizer_name: str, steps: int, out: Path, save_at: tuple[int, ...] = (), **options) -> nn.Module:
    model = make_model(0)
    groups = whiten.param_groups(model, embeddings_and_head="matrix")
    opt = getattr(whiten, optimizer_name)(groups, **options)
    # optimizer index -> layer name, so the spectra are labelled by layer (see whiten.diagnostics.io)
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = [by_id[id(p)] for g in opt.param_groups for p in g["params"]]
    for step, (x, y) in enumerate(batches(steps), start=1):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if step in save_at:
            torch.save(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "param_names": names},
                out / f"{optimizer_name.lower()}_step{step}.pt",
            )
    print(f"{optimizer_name}: final train loss {float(loss.detach()):.4f}")
    torch.save({"model": model.state_dict(), "step": steps}, out / f"{optimizer_name.lower()}_final.pt")
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/diag-figures"))
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    stages = (10, args.steps // 4, args.steps)
    train("KLShampoo", args.steps, args.out, save_at=stages, lr=3e-3, precondition_frequency=10)
    train("Muon", args.steps, args.out, lr=0.02, adamw_lr=1e-3)
    train("HTMuon", args.steps, args.out, lr=0.06, adamw_lr=1e-3)
    run = [sys.executable, "-m", "whiten", "diagnose"]
    ckpts = [str(args.out / f"klshampoo_step{s}.pt") for s in stages]
    subprocess.run([*run, "spectra", *ckpts, "--rank", "8", "--out", str(args.out)], check=True)
    subprocess.run(
        [
            *run,
            "alpha",
            f"Muon={args.out / 'muon_final.pt'}",
            f"HTMuon={args.out / 'htmuon_final.pt'}",
            "--out",
            str(args.out),
        ],
        check=True,
    )
    subprocess.run(
        [
            *run,
            "alpha",
            f"Muon={args.out / 'muon_final.pt'}",
            f"HTMuon={args.out / 'htmuon_final.pt'}",
            "--xmin",
            "median",
            "--out",
            str(args.out / "median"),
            "--no-plots",
        ],
        check=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
