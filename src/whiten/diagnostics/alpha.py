"""Heavy-tailed self-regularisation (HT-SR) metrics of weight matrices (``docs/diagnostics/``).

For a weight matrix ``W`` (conv weights flattened to ``(out, in*kh*kw)``) the empirical spectral
density (ESD) is the set of eigenvalues of ``W^T W``, i.e. ``lam = svdvals(W)^2`` (``min(m, n)``
values). Its upper tail is fitted by a power law ``p(x) ~ x^{-alpha}`` for ``x >= x_min`` with the
continuous maximum-likelihood (Hill) estimator (Clauset, Shalizi & Newman 2009, eq. 3.1)::

    alpha = 1 + n_tail / sum_{lam_j >= x_min} ln(lam_j / x_min)

``x_min`` is chosen by one of two rules, and every result says which:

* ``"median"``: the median eigenvalue (the upper half of the ESD is the tail);
* ``"ks"``: the candidate ``x_min = lam_i`` minimising the Kolmogorov–Smirnov distance between the
  tail's empirical CDF and the fitted power law,
  ``D = max_j |1 - (lam_j / x_min)^{1 - alpha} - j / n_tail|`` (Clauset et al.; WeightWatcher's default).

Smaller ``alpha`` = heavier tail; HT-SR reads ``alpha`` in ~[2, 6] as well trained and HTMuon claims
lower alpha than Muon (docs/diagnostics/alpha.md). Also reported: the stable rank ``||W||_F^2 / ||W||_2^2`` and the
spectral norm ``||W||_2``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

XMIN_RULES = ("ks", "median")


@dataclass(frozen=True)
class PowerLawFit:
    """A Hill/MLE power-law fit of an ESD tail."""

    alpha: float
    xmin: float
    n_tail: int
    ks_distance: float
    rule: str


@dataclass(frozen=True)
class LayerAlpha:
    """HT-SR metrics of one weight matrix."""

    name: str
    module_type: str
    shape: tuple[int, ...]
    alpha: float
    xmin: float
    n_tail: int
    ks_distance: float
    xmin_rule: str
    stable_rank: float
    spectral_norm: float
    n_eigenvalues: int

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


def esd(W: Tensor) -> Tensor:
    """Eigenvalues of ``W^T W`` (ascending, float64): the squared singular values of ``W``."""
    if W.ndim < 2:
        raise ValueError(f"the ESD needs a matrix, got shape {tuple(W.shape)}")
    M = W.detach().reshape(W.shape[0], -1).to(dtype=torch.float64, device="cpu")
    return torch.sort(torch.linalg.svdvals(M).square()).values


def hill_alpha(eigenvalues: Tensor, xmin: float) -> tuple[float, int]:
    """Hill/MLE exponent of the values ``>= xmin`` and the tail size (module doc)."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    if not xmin > 0:
        raise ValueError(f"xmin must be > 0, got {xmin!r}")
    tail = lam[lam >= xmin]
    n = tail.numel()
    log_sum = float(torch.log(tail / xmin).sum())
    if n < 2 or log_sum <= 0:
        raise ValueError(f"the tail above xmin={xmin:g} has {n} distinct-enough values; cannot fit a power law")
    return 1.0 + n / log_sum, n


def ks_distance(tail: Tensor, xmin: float, alpha: float) -> float:
    """``max_j |1 - (lam_j/xmin)^{1-alpha} - j/n|`` over the ascending tail (``j = 0..n-1``)."""
    tail = torch.sort(torch.as_tensor(tail, dtype=torch.float64)).values
    n = tail.numel()
    model_cdf = 1.0 - (tail / xmin).pow(1.0 - alpha)
    empirical = torch.arange(n, dtype=torch.float64) / n
    return float((model_cdf - empirical).abs().max())


def fit_power_law(eigenvalues: Tensor, xmin_rule: str = "ks", *, min_tail: int = 10) -> PowerLawFit:
    """Fit the ESD tail with the Hill estimator, ``x_min`` by ``xmin_rule`` ("ks" or "median").

    ``min_tail`` is the smallest tail the KS search considers (a handful of top eigenvalues fits
    anything). Zero eigenvalues (rank-deficient matrices) never serve as ``x_min``.
    """
    if xmin_rule not in XMIN_RULES:
        raise ValueError(f"xmin_rule={xmin_rule!r} is not valid; use one of {XMIN_RULES}")
    if not isinstance(min_tail, int) or min_tail < 2:
        raise ValueError(f"min_tail must be an integer >= 2, got {min_tail!r}")
    lam = torch.sort(torch.as_tensor(eigenvalues, dtype=torch.float64).flatten()).values
    if not torch.isfinite(lam).all():
        raise ValueError("eigenvalues contain NaN or Inf")
    lam = lam[lam > lam[-1] * 1e-12] if lam.numel() and lam[-1] > 0 else lam[:0]
    N = lam.numel()
    if max(min_tail, 4) > N:
        raise ValueError(f"need at least {max(min_tail, 4)} positive eigenvalues to fit a power law, got {N}")
    if xmin_rule == "median":
        xmin = float(lam[(N - 1) // 2])  # lower median, so at least half of the values form the tail
        alpha, n_tail = hill_alpha(lam, xmin)
        tail = lam[lam >= xmin]
        return PowerLawFit(alpha, xmin, n_tail, ks_distance(tail, xmin, alpha), "median")
    # KS rule: every eigenvalue with >= min_tail values at or above it is a candidate x_min.
    # Vectorised over candidates: suffix sums of log(lam) give each candidate's Hill estimate.
    logs = lam.log()
    suffix_log = torch.flip(torch.cumsum(torch.flip(logs, (0,)), 0), (0,))
    counts = torch.arange(N, 0, -1, dtype=torch.float64)
    denom = suffix_log - counts * logs  # sum_{j >= i} ln(lam_j / lam_i)
    candidates = torch.nonzero((counts >= min_tail) & (denom > 0)).flatten()
    if candidates.numel() == 0:
        raise ValueError("no candidate x_min leaves a non-degenerate tail; the ESD is (nearly) constant")
    alphas = 1.0 + counts[candidates] / denom[candidates]
    best = (math.inf, 0, 0.0)
    chunk = max(1, 4_000_000 // N)
    for start in range(0, candidates.numel(), chunk):
        idx = candidates[start : start + chunk]
        a = alphas[start : start + chunk]
        j = torch.arange(N, dtype=torch.float64)
        # row c: tail starting at idx[c]; entries before it are masked out
        offset = j.unsqueeze(0) - idx.unsqueeze(1).to(torch.float64)
        valid = offset >= 0
        ratio = lam.unsqueeze(0) / lam[idx].unsqueeze(1)
        model = 1.0 - ratio.clamp(min=1.0).pow(1.0 - a.unsqueeze(1))
        empirical = offset / counts[idx].unsqueeze(1)
        D = torch.where(valid, (model - empirical).abs(), torch.zeros((), dtype=torch.float64)).amax(dim=1)
        k = int(torch.argmin(D))
        if float(D[k]) < best[0]:
            best = (float(D[k]), int(idx[k]), float(a[k]))
    D_best, i_best, alpha_best = best
    return PowerLawFit(alpha_best, float(lam[i_best]), N - i_best, D_best, "ks")


def stable_rank(eigenvalues: Tensor) -> float:
    """``sum(lam) / max(lam)`` = ``||W||_F^2 / ||W||_2^2``."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    top = float(lam.max())
    return float(lam.sum()) / top if top > 0 else 0.0


def matrix_alpha(
    W: Tensor, xmin_rule: str = "ks", *, min_tail: int = 10, name: str = "", module_type: str = ""
) -> LayerAlpha:
    """All HT-SR metrics of one matrix."""
    lam = esd(W)
    fit = fit_power_law(lam, xmin_rule, min_tail=min_tail)
    return LayerAlpha(
        name=name,
        module_type=module_type,
        shape=tuple(W.shape),
        alpha=fit.alpha,
        xmin=fit.xmin,
        n_tail=fit.n_tail,
        ks_distance=fit.ks_distance,
        xmin_rule=fit.rule,
        stable_rank=stable_rank(lam),
        spectral_norm=math.sqrt(float(lam[-1])),
        n_eigenvalues=lam.numel(),
    )


def module_type_of(name: str) -> str:
    """A layer-type label from a parameter name: the last module name with digits dropped.

    ``blocks.3.attn.c_proj.weight`` -> ``attn.c_proj``; ``layers.0.mlp.fc1.weight`` -> ``mlp.fc1``.
    """
    parts = [p for p in name.split(".") if p and not p.isdigit() and p not in ("weight", "module", "_orig_mod")]
    return ".".join(parts[-2:]) if parts else name


def _named_matrices(
    source: nn.Module | Mapping[str, Tensor], include: Iterable[str] | None
) -> list[tuple[str, Tensor]]:
    if isinstance(source, nn.Module):
        items = [(n, p) for n, p in source.named_parameters()]
    elif isinstance(source, Mapping):
        items = [(n, v) for n, v in source.items() if isinstance(v, Tensor)]
    else:
        raise ValueError(f"weight_alpha needs an nn.Module or a state_dict mapping, got {type(source).__name__}")
    wanted = None if include is None else tuple(include)
    out = []
    for name, tensor in items:
        if tensor.ndim < 2 or not tensor.is_floating_point() or min(tensor.shape[0], tensor[0].numel()) < 2:
            continue
        if wanted is not None and not any(w in name for w in wanted):
            continue
        out.append((name, tensor))
    return out


def weight_alpha(
    model: nn.Module | Mapping[str, Tensor],
    xmin_rule: str = "ks",
    *,
    min_tail: int = 10,
    include: Iterable[str] | None = None,
) -> list[LayerAlpha]:
    """HT-SR metrics of every weight matrix (``ndim >= 2``) of a model or a state_dict.

    ``include``: keep only parameters whose name contains one of these substrings. Matrices whose
    ESD is too small to fit (fewer than ``min_tail`` positive eigenvalues) are skipped.
    """
    results = []
    for name, W in _named_matrices(model, include):
        if min(W.shape[0], W[0].numel()) < min_tail:
            continue
        results.append(matrix_alpha(W, xmin_rule, min_tail=min_tail, name=name, module_type=module_type_of(name)))
    if not results:
        raise ValueError(
            f"no weight matrix with at least {min_tail} singular values found; "
            "pass a model or state_dict with 2-D weights"
        )
    return results


def mean_by_type(layers: Iterable[LayerAlpha]) -> dict[str, dict[str, float]]:
    """Mean alpha, stable rank and spectral norm per module type, plus ``"ALL"``."""
    groups: dict[str, list[LayerAlpha]] = defaultdict(list)
    for layer in layers:
        groups[layer.module_type].append(layer)
        groups["ALL"].append(layer)
    return {
        key: {
            "count": len(vals),
            "alpha": sum(v.alpha for v in vals) / len(vals),
            "stable_rank": sum(v.stable_rank for v in vals) / len(vals),
            "spectral_norm": sum(v.spectral_norm for v in vals) / len(vals),
        }
        for key, vals in sorted(groups.items())
    }


def format_alpha_table(layers: list[LayerAlpha]) -> str:
    """A plain-text per-layer table."""
    header = (
        f"{'layer':<40} {'shape':>13} {'alpha':>7} {'xmin':>10} {'tail':>5} {'KS D':>6} {'st.rank':>8} {'||W||2':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in layers:
        shape = "x".join(str(s) for s in r.shape)
        lines.append(
            f"{r.name[:40]:<40} {shape:>13} {r.alpha:>7.3f} {r.xmin:>10.3g} {r.n_tail:>5d} {r.ks_distance:>6.3f} "
            f"{r.stable_rank:>8.2f} {r.spectral_norm:>8.3f}"
        )
    return "\n".join(lines)
