"""Muon and HTMuon: momentum, then a spectral map of the momentum matrix.

Both run, per matrix parameter ``W`` (``m x n``; conv weights flattened to ``(out, in*kh*kw)``)::

    buf <- lerp(buf, G, 1 - mu)                       # EMA momentum
    U   <- lerp(G, buf, mu) if nesterov else buf      # out of place, p.grad is never modified
    O   <- spectral_map(U)                            # Muon: NS(U) ~ polar(U); HTMuon: A diag(s^p) B^T
    O   <- normuon(O)                                 # optional (HTMuon): row-wise second moment
    O   <- O * sqrt(max(1, m/n))                      # "original" (Keller)  or  0.2 sqrt(max(m, n))
    W   <- W (1 - lr wd) - lr O                       # decoupled decay with the unadjusted lr

Sources: KellerJordan/Muon, ``torch.optim.Muon`` (PyTorch 2.9+), HTMuon (reference code
TDCSZ327/HTmuon). See ``docs/muon_htmuon.md`` for defaults and deliberate deviations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Unpack

import torch
from torch import Tensor

from whiten.linalg import (
    KELLER_QUINTIC,
    NS_METHODS,
    STREAM_STARTS,
    FlopCount,
    compiled_newton_schulz,
    initial_stream_basis,
    map_batched,
    matmul_flops,
    newton_schulz,
    newton_schulz_flops,
    ns_power_rounds,
    qr_flops,
    schatten_power_ns,
    schatten_power_stream,
    schatten_power_svd,
    svd_flops,
)
from whiten.linalg.precision import MATMUL_DTYPES, full_precision
from whiten.optim import _options as opt
from whiten.optim._adamw import apply_update_
from whiten.optim._options import CommonOptions, constructor_options
from whiten.optim.base import MapInput, PhasedOptimizer, as_matrix, stat_dtype

#: Newton–Schulz dtypes: the shared matmul_dtype policy (whiten.linalg.MATMUL_DTYPES) and an explicit fp64
_NS_DTYPES = {**MATMUL_DTYPES, "float64": torch.float64}
#: coupled Newton–Schulz square-root iterations per root of HTMuon's NS variant (the reference's 5)
_SQRT_STEPS = 5


def shape_factor(shape: torch.Size | Sequence[int], adjust_lr_fn: str | None) -> float:
    """Muon's lr adjustment for an ``m x n`` matrix (``torch.optim.Muon``'s ``adjust_lr_fn``)."""
    m, n = shape[0], shape[1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, m / n))
    return 0.2 * math.sqrt(max(m, n))


def normuon_normalize_(O: Tensor, row_second_moment: Tensor, beta2: float, eps: float = 1e-10) -> Tensor:
    """NorMuon: per-row EMA of ``mean(O^2)``, divide rows by its root, keep ``||O||_F``.

    Updates ``row_second_moment`` in place and returns the normalised matrix.
    """
    row_second_moment.lerp_(O.square().mean(dim=-1), 1.0 - beta2)
    normalized = O * torch.rsqrt(row_second_moment + eps).unsqueeze(-1)
    scale = torch.linalg.matrix_norm(O) / torch.linalg.matrix_norm(normalized).clamp(min=1e-30)
    return normalized * scale


def _with_ns_dtype(options: dict[str, Any]) -> dict[str, Any]:
    """The constructor's options with the older ``ns_dtype=`` (when given) as ``matmul_dtype``."""
    ns_dtype = options.pop("ns_dtype")
    if ns_dtype is None:
        return options
    if options["matmul_dtype"] not in ("bfloat16", ns_dtype):  # an explicit matmul_dtype other than the default
        raise ValueError(
            f"ns_dtype={ns_dtype!r} (the older name of matmul_dtype) contradicts "
            f"matmul_dtype={options['matmul_dtype']!r}"
        )
    opt.choice(*_NS_DTYPES)("ns_dtype", ns_dtype)
    return {**options, "matmul_dtype": ns_dtype}


class _SpectralMomentum(PhasedOptimizer):
    """Shared step of :class:`Muon` and :class:`HTMuon` (the map is chosen by the group's options)."""

    option_checks: ClassVar[dict[str, opt.Check]] = {
        "momentum": opt.unit_interval,
        "nesterov": opt.boolean,
        "ns_coefficients": opt.ns_coefficients,
        "ns_steps": opt.positive_int,
        "matmul_dtype": opt.choice(*_NS_DTYPES),
        "ns_method": opt.choice(*NS_METHODS),
        "compile_ns": opt.boolean,
        "eps": opt.positive,  # divides: X / max(||X||_F, eps)
        "adjust_lr_fn": opt.choice(None, "original", "match_rms_adamw"),
        "power": opt.either(opt.nonneg, what="a number >= 0"),
        "spectral_map": opt.choice("ns", "svd", "stream"),
        "stream_start": opt.choice(*STREAM_STARTS),
        "interval": opt.positive_int,
        "normuon": opt.boolean,
        "normuon_beta2": opt.unit_interval,
        "ns_ridge": opt.nonneg,
    }

    option_aliases: ClassVar[Mapping[str, str]] = {"ns_dtype": "matmul_dtype"}

    def _validate(self, group: Mapping[str, Any]) -> None:
        super()._validate(group)
        if group.get("spectral_map") == "ns" and group.get("power", 0.0) > 1:
            raise ValueError(f"spectral_map='ns' supports 0 < power <= 1, got power={group['power']}")
        if group.get("ns_method") == "spectral" and group.get("matmul_dtype") == "bfloat16":
            raise ValueError(
                "ns_method='spectral' needs an eigh, which has no bf16 kernel: use matmul_dtype='float32'"
                " or another ns_method"
            )

    # The step in the three phases of PhasedOptimizer: under FSDP2 the elementwise phases run on the
    # local shards and only the map on whole matrices (docs/distributed.md). The elementwise phases'
    # state, kept on every rank (the momentum shaped, and under FSDP2 sharded, like the parameter; the
    # step counter):
    elementwise_state: ClassVar[tuple[str, ...]] = ("momentum_buffer", "step")
    # torch.optim.Muon's buffer is the same EMA (lerp with 1 - momentum): its state carries over
    foreign_matrix_state: ClassVar[tuple[str, ...]] = ("momentum_buffer",)

    def needs_exact_counts(self, group: Mapping[str, Any], params: Sequence[Tensor]) -> bool:
        """The power map's steps follow the step counter (``interval > 1``): one may be due on this step."""
        every = group["interval"]
        if every == 1 or not (group["power"] > 0 or group["spectral_map"] != "ns"):
            return False
        return any((self.state[p]["step"] + 1) % every == 0 for p in params)

    def _direction_phase(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[MapInput]:
        """Elementwise: ``step += 1``, ``buf <- lerp(buf, G, 1 - mu)``, ``U = lerp(G, buf, mu)`` (Nesterov) or ``buf``.

        Works unchanged on whole tensors, local shards or DTensors; returns ``U`` shaped like each parameter.
        """
        mu = group["momentum"]
        directions: list[MapInput] = []
        for p, g in zip(params, grads, strict=True):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(
                    p, dtype=stat_dtype(p), memory_format=torch.contiguous_format
                )
                state["step"] = 0
            state["step"] += 1
            buf = state["momentum_buffer"]
            g_wide = g.to(buf.dtype)
            buf.lerp_(g_wide, 1.0 - mu)
            directions.append(MapInput(g_wide.lerp(buf, mu) if group["nesterov"] else buf))
        return directions

    def _map_phase(self, group: dict[str, Any], params: list[Tensor], inputs: list[MapInput]) -> list[Tensor]:
        """Whole-matrix: ``O = spectral_map(U)`` (NS, or the HT map on its steps), then NorMuon's row normalisation.

        ``inputs`` hold the whole (parameter-shaped) directions ``U``; ``params`` only key the state (step
        counter, NorMuon row moments, stream basis) and give the weight dtype. Returns ``O`` shaped like each
        parameter, never in a wider dtype than its direction.
        """
        matrices = [as_matrix(x.direction) for x in inputs if x.direction is not None]
        if len(matrices) != len(params):
            raise ValueError("Muon's map needs a direction for every parameter")
        if not matrices:
            return []
        # the Newton–Schulz dtype is explicit (matmul_dtype): a surrounding autocast must not lower the rest
        with full_precision(matrices[0].device):
            return self._spectral_map(group, params, matrices)

    def _spectral_map(self, group: dict[str, Any], params: list[Tensor], matrices: list[Tensor]) -> list[Tensor]:
        # "ns" at power 0 is plain Muon; any other map (exact SVD polar at p = 0 included) is the HT map
        is_power_map = group["power"] > 0 or group["spectral_map"] != "ns"
        use_ht = [is_power_map and self.state[p]["step"] % group["interval"] == 0 for p in params]

        outputs: list[Tensor | None] = [None] * len(params)
        ns_idx = [i for i, ht in enumerate(use_ht) if not ht]
        if ns_idx:
            ns_dtype = _NS_DTYPES[group["matmul_dtype"]]
            # fp64 parameters iterate in fp64 whatever matmul_dtype says (statistics "fp32 or better")
            ns_inputs = [matrices[i] for i in ns_idx]
            ns_kernel = compiled_newton_schulz() if group["compile_ns"] else newton_schulz
            ns_out = map_batched(
                lambda X: ns_kernel(
                    X,
                    group["ns_steps"],
                    group["ns_coefficients"],
                    compute_dtype=torch.float64 if X.dtype == torch.float64 else ns_dtype,
                    eps=group["eps"],
                    method=group["ns_method"],
                ),
                ns_inputs,
                # where stacking pays (small matrices on CPU, any on accelerators), cast to the NS dtype during the
                # stacking copy; NS(U^T) = NS(U)^T (newton_schulz iterates on the wide orientation anyway), so a tall
                # matrix joins the batch of its transposes
                dtype=None if any(U.dtype == torch.float64 for U in ns_inputs) else ns_dtype,
                transposable=True,
            )
            for i, O in zip(ns_idx, ns_out, strict=True):
                outputs[i] = O
        ht_idx = [i for i, ht in enumerate(use_ht) if ht]
        if ht_idx:
            mapped = self._power_map(group, [params[i] for i in ht_idx], [matrices[i] for i in ht_idx])
            for i, O in zip(ht_idx, mapped, strict=True):
                outputs[i] = O

        results = []
        for p, U, mapped_O in zip(params, matrices, outputs, strict=True):
            assert mapped_O is not None
            O = mapped_O
            if group["normuon"] or p.dtype != U.dtype:
                # fp32 arithmetic; a bf16 weight is then updated in fp32 and rounded once
                O = O.to(U.dtype)
            # else a bf16 NS output is added straight into the fp32/fp64 weight (no cast pass)
            if group["normuon"]:
                state = self.state[p]
                if "normuon_v" not in state:
                    state["normuon_v"] = torch.zeros(U.shape[0], dtype=U.dtype, device=U.device)
                O = normuon_normalize_(O, state["normuon_v"], group["normuon_beta2"])
            results.append(O.reshape(p.shape))
        return results

    def _apply_phase(self, group: dict[str, Any], params: list[Tensor], updates: list[Tensor]) -> None:
        """Elementwise: ``W <- W (1 - lr wd) - lr alpha(m, n) O``.

        ``updates`` have the layout of ``params`` (whole tensors, or DTensors sharded like them); the shape
        factor ``alpha`` depends only on the whole matrix shape ``p.shape``, which a DTensor also reports.
        """
        for p, O in zip(params, updates, strict=True):
            matrix_shape = (p.shape[0], math.prod(p.shape[1:]))  # as_matrix's view of the parameter
            apply_update_(
                p, O, group["lr"], group["weight_decay"], update_scale=shape_factor(matrix_shape, group["adjust_lr_fn"])
            )

    def matrix_flops(self, shape: Sequence[int], group: Mapping[str, Any]) -> FlopCount:
        """One step of an ``m x n`` matrix: Newton–Schulz as :meth:`_map_phase` evaluates it, or on the power
        map's steps (every ``interval``-th) that map: SVD then ``(A s^p) B^T``; the NS variant's Gram, ``k``
        coupled square roots (``3 * 5 - 3`` products each, :func:`whiten.linalg.coupled_newton_schulz_sqrt`),
        NS and the product with the root; the stream variant's four products and QR."""
        m, n = int(shape[0]), math.prod(int(s) for s in shape[1:])
        dtype = _NS_DTYPES[group["matmul_dtype"]]
        ns = newton_schulz_flops((m, n), group["ns_steps"], group["ns_method"], dtype)
        if not (group["power"] > 0 or group["spectral_map"] != "ns"):
            return ns
        s, l = sorted((m, n))
        kind = group["spectral_map"]
        if kind == "svd":
            power_map = svd_flops(m, n) + matmul_flops(m, s, n)
        elif kind == "stream":
            power_map = 3 * matmul_flops(m, n, s) + matmul_flops(m, s, n) + qr_flops(n, s)
        else:  # the NS variant keeps fp32 work (torch.float32) for the Gram, its roots and the final product
            rounds = ns_power_rounds(group["power"])
            power_map = (
                matmul_flops(s, l, s)
                + rounds * (3 * _SQRT_STEPS - 3) * matmul_flops(s, s, s)
                + ns
                + matmul_flops(s, s, l)
            )
        every = group["interval"]
        return ns * (1.0 - 1.0 / every) + power_map / every

    def _power_map(self, group: dict[str, Any], params: list[Tensor], directions: list[Tensor]) -> list[Tensor]:
        power = group["power"]
        kind = group["spectral_map"]
        if kind == "svd":
            return map_batched(lambda X: schatten_power_svd(X, power), directions)
        if kind == "ns":
            return map_batched(
                lambda X: schatten_power_ns(
                    X,
                    power,
                    ns_steps=group["ns_steps"],
                    ns_coefficients=group["ns_coefficients"],
                    sqrt_steps=_SQRT_STEPS,
                    ridge=group["ns_ridge"],
                    ns_dtype=_NS_DTYPES[group["matmul_dtype"]],
                    eps=group["eps"],
                    method=group["ns_method"],
                ),
                directions,
            )
        outs = []
        for p, U in zip(params, directions, strict=True):
            state = self.state[p]
            if "stream_basis" not in state:
                state["stream_basis"] = initial_stream_basis(U, group["stream_start"])
            O, state["stream_basis"] = schatten_power_stream(U, state["stream_basis"], power)
            outs.append(O)
        return outs


class Muon(_SpectralMomentum):
    r"""Muon: MomentUm Orthogonalized by Newton–Schulz (Keller Jordan et al., 2024).

    .. math::
        B_t = \mu B_{t-1} + (1-\mu) G_t,\quad U_t = \text{nesterov} ? (1-\mu) G_t + \mu B_t : B_t,\\
        W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\alpha(m, n)\,\mathrm{NS}_5(U_t)

    Accepts ``torch.optim.Muon``'s arguments with the same names and meanings (``lr,
    weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn``). Unlike it,
    parameters with fewer than 2 dims (and any group with ``use_matrix=False``) are trained by a
    built-in AdamW with ``adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay``; use
    :func:`whiten.param_groups` to also put embeddings and the output head on AdamW.

    Args:
        lr: Muon learning rate (before the shape factor).
        weight_decay: decoupled weight decay, applied as ``W *= 1 - lr * weight_decay``.
        momentum: EMA coefficient ``mu`` of the momentum buffer.
        nesterov: use ``lerp(G, buf, mu)`` instead of ``buf``.
        ns_coefficients: ``"keller"``, ``"polar_express"``, one ``(a, b, c)`` tuple or a list of them.
        eps: floor of the Frobenius normaliser before Newton–Schulz.
        ns_steps: Newton–Schulz iterations.
        adjust_lr_fn: ``None``/``"original"`` (``sqrt(max(1, m/n))``) or ``"match_rms_adamw"``
            (``0.2 sqrt(max(m, n))``, Moonlight).
        matmul_dtype: dtype of the Newton–Schulz iteration: ``"bfloat16"`` (default, as KellerJordan/Muon
            and ``torch.optim.Muon``; the hardware's fast path), ``"float32"`` (accurate) or ``"float64"``;
            fp64 parameters always iterate in fp64 (``docs/precision.md``).
        ns_dtype: the older name of ``matmul_dtype`` (old code and checkpoints keep working).
        ns_method: ``"auto"`` (default), ``"direct"``, ``"gram"`` or ``"spectral"``: how the same NS
            polynomial is evaluated (:func:`whiten.linalg.newton_schulz`). ``"auto"`` runs it on the small
            Gram matrix for fp32/fp64 matrices with one side >= 1.5x the other (fewer FLOPs, and closer
            to the exact polynomial in fp32; :func:`whiten.linalg.prefers_gram`) and directly otherwise
            (bf16 included, where the Gram path loses accuracy). ``"spectral"`` evaluates it on the
            eigenvalues of the Gram matrix (one ``eigh``; fp32/fp64 only).
        compile_ns: run the Newton–Schulz iteration through ``torch.compile``
            (:func:`whiten.linalg.compiled_newton_schulz`; opt-in, default off; compiles once per shape).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the built-in AdamW (defaults shared by every
            class: ``docs/shared_behaviour.md``; ``adamw_lr=None`` means ``lr``).
        nonfinite: ``"skip"`` or ``"raise"`` on a NaN/Inf gradient (see :class:`WhitenOptimizer`).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        *,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: str | Sequence[float] | Sequence[Sequence[float]] = KELLER_QUINTIC,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        matmul_dtype: str = "bfloat16",
        ns_dtype: str | None = None,
        ns_method: str = "auto",
        compile_ns: bool = False,
        **common: Unpack[CommonOptions],
    ) -> None:
        options = _with_ns_dtype(constructor_options(locals()))  # before any other local is defined
        # HTMuon's options at their Muon values (power 0 is plain Newton–Schulz), so one step serves both
        muon_map = dict(
            power=0.0,
            spectral_map="ns",
            stream_start="svd",
            interval=1,
            normuon=False,
            normuon_beta2=0.95,
            ns_ridge=1e-6,
        )
        super().__init__(params, {**options, **muon_map})


class HTMuon(_SpectralMomentum):
    r"""HTMuon: Muon with singular values mapped to ``s^p`` instead of 1 (reference code TDCSZ327/HTmuon).

    .. math::
        U_t = A\,\mathrm{diag}(s)\,B^\top,\quad
        W_t = W_{t-1}(1-\eta\lambda) - \eta\,\sqrt{\max(1, m/n)}\;A\,\mathrm{diag}(s^p)\,B^\top

    ``A diag(s^p) B^T`` is steepest descent under the Schatten-q norm, ``q = 1 + 1/p``; ``p = 0``
    is Muon. The update is deliberately NOT normalised (as the reference), so its magnitude is
    ~0.24-0.42x Muon's and the released lr is 3x Muon's.

    Args:
        lr: learning rate (reference scripts: 0.03 at 60M/135M, 5e-3 at 350M/1B).
        power: exponent ``p`` (default 0.125).
        spectral_map: ``"svd"`` (exact fp32 SVD, default), ``"ns"`` (the reference NS variant:
            ``NS(U) (U^T U + ns_ridge I)^(p/2)`` by repeated coupled NS square roots, ``p`` rounded
            to ``2^(1-k)``; the NS factor honours ``matmul_dtype``, ``ns_method``, ``ns_steps``,
            ``ns_coefficients`` and ``eps``) or ``"stream"`` (one warm-started subspace iteration per step).
        stream_start: first basis of ``"stream"``: ``"svd"`` (default: right singular vectors of the first
            direction, so the first step is exact) or ``"identity"`` (identity columns, as the reference).
        interval: apply the power map on steps ``t % interval == 0`` (1-based) and plain
            Newton–Schulz Muon otherwise; the counter is saved in the state.
        normuon: apply the NorMuon row normalisation after the map (``normuon_beta2``).
        Other arguments as :class:`Muon`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        momentum: float = 0.95,
        weight_decay: float = 0.1,
        nesterov: bool = True,
        power: float = 0.125,
        spectral_map: str = "svd",
        interval: int = 1,
        normuon: bool = False,
        stream_start: str = "svd",
        normuon_beta2: float = 0.95,
        ns_steps: int = 5,
        ns_coefficients: str | Sequence[float] | Sequence[Sequence[float]] = KELLER_QUINTIC,
        matmul_dtype: str = "bfloat16",
        ns_dtype: str | None = None,
        ns_method: str = "auto",
        compile_ns: bool = False,
        ns_ridge: float = 1e-6,
        eps: float = 1e-7,
        adjust_lr_fn: str | None = None,
        **common: Unpack[CommonOptions],
    ) -> None:
        super().__init__(params, _with_ns_dtype(constructor_options(locals())))
