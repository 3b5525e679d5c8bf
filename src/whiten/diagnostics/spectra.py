"""Spike-and-flat spectra of Kronecker factors (Pro-KLShampoo, arXiv 2605.06316; ``docs/diagnostics/spectra.md``).

For every matrix parameter and side of a Kronecker-factored optimizer (SOAP / REKLS / KL-Shampoo /
KL-SOAP: ``L`` is ``m x m``, ``R`` is ``n x n``; Pro-KLShampoo: full ``L`` and the restricted side
``U diag(Lam) U^T + sigma P_perp``, reported as side ``"U"``) this module reports

* the factor's eigenvalues (descending),
* the energy (trace fraction) in the top ``r``,
* the tail's ``AM/GM`` ratio and the KL gap ``k (d - r)/2 log(AM/GM)`` of restricting that factor
  to rank ``r`` (``d`` its dimension, ``k`` the other dimension), also per matrix entry
  (divided by ``k d``) so one tolerance means the same for every layer shape,
* the rank that a tolerance would choose: the smallest ``r`` in ``[1, max_rank]`` with
  ``gap(r) / k <= tol`` nats. This is computed by Pro-KLShampoo's own rule,
  :func:`whiten.optim.pro_kl_shampoo.adaptive_rank` (``ProKLShampoo(adaptive_rank=True,
  rank_tolerance=tol)``, default 0.5), with ``max_rank`` = the number of tracked directions for the
  side ``"U"`` (as the optimizer bounds it) and the factor's dimension for a full factor.

The statistics come from :mod:`whiten.linalg.spectrum`. Sources: a live optimizer, its
``state_dict``, or a checkpoint file (see :mod:`whiten.diagnostics.io` for the format).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from whiten.diagnostics.io import find_optimizer_state, optimizer_param_names
from whiten.linalg.spectrum import energy_captured, kl_gap_all, tail_log_am_gm_all
from whiten.optim import registry
from whiten.optim.pro_kl_shampoo import adaptive_rank

FACTOR_SOURCES = ("factor", "lam")


def expected_factors() -> str:
    """Which per-parameter state keys hold factors, by optimizer (from the registry), for error messages."""
    keys: dict[tuple[str, ...], list[str]] = {}
    for name in registry.names():
        spec = registry.get(name)
        if spec.factors:
            keys.setdefault(spec.factors, []).append(name)
    return "expected per-parameter keys " + " or ".join(f"{'/'.join(k)} ({', '.join(v)})" for k, v in keys.items())


@dataclass
class FactorSpectrum:
    """Spectrum statistics of one side of one layer's Kronecker preconditioner."""

    layer: str
    side: str
    dim: int
    other_dim: int
    rank: int
    energy_top_r: float
    tail_am_gm: float
    kl_gap: float
    kl_gap_per_entry: float
    tol: float | None
    chosen_rank: int | None
    eigenvalues: list[float] = field(repr=False)
    source: str = "factor"
    max_rank: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _factor_eigs(state: Mapping[str, Any], use: str) -> list[tuple[str, Tensor, int, int]]:
    """(side, eigenvalues, dimension, rank bound) for each factor held in one parameter's state.

    The rank bound is what Pro-KLShampoo's adaptive rank is limited to: the tracked directions for
    its restricted side ``"U"``, the dimension for a full factor.
    """
    out = []
    for side in ("L", "R"):
        lam_key = f"lam_{side}"
        if use == "lam" and isinstance(state.get(lam_key), Tensor) and state[lam_key].ndim == 1:
            eigs = state[lam_key].detach().double().cpu()
            out.append((side, eigs, eigs.numel(), eigs.numel()))
            continue
        factor = state.get(side)
        if isinstance(factor, Tensor) and factor.ndim == 2 and factor.shape[0] == factor.shape[1]:
            F = factor.detach().double().cpu()
            eigs = torch.linalg.eigvalsh(0.5 * (F + F.mT))
            out.append((side, eigs, F.shape[0], F.shape[0]))
    U, Lam, sigma = state.get("U"), state.get("Lam"), state.get("sigma")
    if isinstance(U, Tensor) and isinstance(Lam, Tensor) and sigma is not None:
        dim, r = U.shape[0], U.shape[1]
        sig = float(sigma) if not isinstance(sigma, Tensor) else float(sigma.detach().double().cpu().reshape(-1)[0])
        # as ProKLShampoo's adaptive rank reads them: tracked Lam, then sigma for the other dim - r (inf -> 0)
        lam = Lam.detach().double().cpu().reshape(-1)
        eigs = torch.cat(
            [
                lam.masked_fill(lam.isinf(), 0.0),
                torch.full((dim - r,), 0.0 if math.isinf(sig) else sig, dtype=torch.float64),
            ]
        )
        out.append(("U", eigs, dim, r))
    return out


def _matrix_numel(state: Mapping[str, Any], sides: list[tuple[str, Tensor, int]]) -> int | None:
    """Entries of the (matricised) parameter: from the momentum, else from the two factor sizes."""
    exp_avg = state.get("exp_avg")
    if isinstance(exp_avg, Tensor) and exp_avg.ndim >= 2:
        return exp_avg.numel()
    dims = [dim for _, _, dim, _ in sides]
    return dims[0] * dims[1] if len(dims) == 2 else None


def spectrum_stats(
    eigenvalues: Tensor, other_dim: int, rank: int, tol: float | None = None, max_rank: int | None = None
) -> dict[str, float | int | None]:
    """Energy, tail AM/GM, KL gap (total and per entry) at ``rank``, and the rank ``tol`` chooses.

    The chosen rank is ``ProKLShampoo``'s :func:`~whiten.optim.pro_kl_shampoo.adaptive_rank` bounded by
    ``max_rank`` (default: the dimension).
    """
    d = eigenvalues.numel()
    r = min(rank, d)
    gaps = kl_gap_all(eigenvalues, other_dim)
    return {
        "rank": r,
        "energy_top_r": energy_captured(eigenvalues, r),
        "tail_am_gm": float(torch.exp(tail_log_am_gm_all(eigenvalues)[r])),
        "kl_gap": float(gaps[r]),
        "kl_gap_per_entry": float(gaps[r]) / (other_dim * d),
        # ProKLShampoo(adaptive_rank=True, rank_tolerance=tol)'s own function: gap / other_dim <= tol in [1, max_rank]
        "chosen_rank": None if tol is None else adaptive_rank(eigenvalues, other_dim, tol, max_rank or d),
    }


def _state_items(source: Any) -> list[tuple[int, str, Mapping[str, Any]]]:
    """(parameter index, default name, per-parameter state) from an optimizer, state_dict or checkpoint."""
    if isinstance(source, torch.optim.Optimizer):
        params = [p for g in source.param_groups for p in g["params"]]
        return [(i, f"param{i}", source.state[p]) for i, p in enumerate(params) if p in source.state]
    sd = find_optimizer_state(source)
    names = optimizer_param_names(sd)
    return [(int(k), names.get(int(k), f"param{k}"), v) for k, v in sd["state"].items()]


def factor_spectra(
    source: torch.optim.Optimizer | Mapping[str, Any],
    *,
    rank: int = 16,
    tol: float | None = None,
    use: str = "factor",
    names: Mapping[int, str] | None = None,
    allow_empty: bool = False,
) -> list[FactorSpectrum]:
    """Spectra of every Kronecker factor held by ``source`` (see module doc).

    ``source``: a live optimizer, its ``state_dict()``, or a checkpoint dict containing one.
    ``rank``: the ``r`` at which energy / AM-GM / KL gap are reported (capped at each factor's dim).
    ``tol``: KL tolerance (nats per column of the other side, Pro-KLShampoo's ``rank_tolerance``) for
    the adaptive rank, or None.
    ``use``: ``"factor"`` = eigenvalues of the stored factor matrix; ``"lam"`` = the EMA eigenvalues
    that KL-Shampoo actually preconditions with (``lam_L`` / ``lam_R``) where the state has them.
    ``names``: optional parameter index -> name (e.g. from :func:`param_names`).
    ``allow_empty``: return ``[]`` instead of raising when no factor is found (Muon, AdamW, unstepped).
    """
    if use not in FACTOR_SOURCES:
        raise ValueError(f"use={use!r} is not valid; use one of {FACTOR_SOURCES}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"rank must be an integer >= 0, got {rank!r}")
    results = []
    for index, layer, state in _state_items(source):
        if names is not None and index in names:
            layer = names[index]
        sides = _factor_eigs(state, use)
        numel = _matrix_numel(state, sides)
        for side, eigs, dim, bound in sides:
            if numel is None or numel % dim:
                continue  # cannot tell the other dimension (a one-sided factor without momentum)
            other = numel // dim
            if float(eigs.max()) <= 0:
                continue  # a factor that has not seen a gradient yet
            stats = spectrum_stats(eigs, other, rank, tol, bound)
            results.append(
                FactorSpectrum(
                    layer=layer,
                    side=side,
                    dim=dim,
                    other_dim=other,
                    tol=tol,
                    eigenvalues=torch.sort(eigs, descending=True).values.tolist(),
                    source=use if (use == "lam" and f"lam_{side}" in state) else "factor",
                    max_rank=bound,
                    **stats,  # type: ignore[arg-type]
                )
            )
    if not results and not allow_empty:
        raise ValueError(
            f"no Kronecker factor found in the optimizer state ({expected_factors()}); was the optimizer stepped?"
        )
    return results


def param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[int, str]:
    """Index (order of ``optimizer.param_groups``) -> parameter name in ``model``."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {i: by_id.get(id(p), f"param{i}") for i, p in enumerate(params)}


def record_spectra(
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None = None,
    *,
    step: int | None = None,
    rank: int = 16,
    tol: float | None = 0.5,
    use: str = "factor",
) -> dict[str, Any]:
    """One JSON-ready snapshot ``{"step", "rank", "tol", "factors": [FactorSpectrum dicts]}``.

    Meant for a training loop's ``--record-every`` hook; collect the snapshots in a list and
    pass it to :func:`plot_spectra` (or save it as JSON and run ``whiten diagnose spectra``).
    Parameters not yet stepped are skipped; an optimizer without Kronecker factors (Muon, AdamW)
    gives an empty ``"factors"`` list, so the hook can run for every optimizer of a benchmark.
    """
    names = None if model is None else param_names(optimizer, model)
    factors = factor_spectra(optimizer, rank=rank, tol=tol, use=use, names=names, allow_empty=True)
    return {"step": step, "rank": rank, "tol": tol, "factors": [f.as_dict() for f in factors]}


def format_spectra_table(factors: Iterable[FactorSpectrum | Mapping[str, Any]]) -> str:
    """Per layer and side: dims, top eigenvalues, energy / AM-GM / KL gap at r, chosen rank."""
    header = (
        f"{'layer':<34} {'side':>4} {'d':>5} {'k':>5} {'lam1':>9} {'lam1/lam2':>9} {'r':>4} {'energy@r':>8} "
        f"{'AM/GM':>8} {'KLgap':>10} {'gap/entry':>10} {'r(tol)':>6}"
    )
    lines = [header, "-" * len(header)]
    for f in factors:
        f = f.as_dict() if isinstance(f, FactorSpectrum) else f
        eigs = f["eigenvalues"]
        ratio = eigs[0] / eigs[1] if len(eigs) > 1 and eigs[1] > 0 else float("inf")
        chosen = "-" if f["chosen_rank"] is None else str(f["chosen_rank"])
        lines.append(
            f"{str(f['layer'])[:34]:<34} {f['side']:>4} {f['dim']:>5} {f['other_dim']:>5} {eigs[0]:>9.3g} "
            f"{ratio:>9.3f} {f['rank']:>4} {f['energy_top_r']:>8.3f} {f['tail_am_gm']:>8.4f} {f['kl_gap']:>10.4g} "
            f"{f['kl_gap_per_entry']:>10.3g} {chosen:>6}"
        )
    return "\n".join(lines)
