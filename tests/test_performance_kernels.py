"""The performance paths compute what the plain paths compute.

* ``adamw_foreach_`` (PyTorch's fused AdamW for same-dtype parameters, the eager kernel for the
  rest) against ``adamw_step_`` and against ``torch.optim.AdamW``;
* ``apply_update_`` with ``update_scale`` and with a narrower (bf16) update;
* ``map_batched`` with stacking on and off, and with the stacking cast;
* Muon with ``ns_dtype="bfloat16"`` adds the bf16 output straight into an fp32 weight, as
  ``torch.optim.Muon`` does.
"""

from __future__ import annotations

import pytest
import torch

import whiten
from whiten.linalg import map_batched, newton_schulz
from whiten.linalg.batching import stacking_helps
from whiten.optim._adamw import adamw_foreach_, adamw_step_, apply_update_
from whiten.optim.base import stat_dtype


def _params(dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    return [
        torch.randn(5, 7, generator=gen).to(dtype),
        torch.randn(3, generator=gen).to(dtype),
        torch.randn(6, 4, generator=gen).to(dtype).mT,  # non-contiguous: eager path
        torch.randn(2, 3, 2, 2, generator=gen).to(dtype),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_adamw_foreach_matches_eager_kernel(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    fused = _params(dtype, gen)
    eager = [p.clone() for p in fused]
    fused_states: list[dict] = [{} for _ in fused]
    eager_states: list[dict] = [{} for _ in eager]
    hyper = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in fused]
        adamw_foreach_(fused, grads, fused_states, stat_dtype=stat_dtype, **hyper)
        for p, g, s in zip(eager, grads, eager_states, strict=True):
            adamw_step_(p, g, s, stat_dtype=stat_dtype(p), **hyper)
    tol = {torch.float32: 1e-6, torch.float64: 1e-13, torch.bfloat16: 0.0}[dtype]
    for a, b, sa, sb in zip(fused, eager, fused_states, eager_states, strict=True):
        assert sa["step"] == sb["step"] == 6
        assert sa["exp_avg"].dtype == sb["exp_avg"].dtype == stat_dtype(a)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=tol, atol=tol)


def test_adamw_fallback_matches_torch_adamw_with_late_parameters() -> None:
    """Parameters joining later have their own step count (one fused call per step bucket)."""
    gen = torch.Generator().manual_seed(1)
    ours = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    ref = [p.clone() for p in ours]
    opt = whiten.Muon([{"params": ours, "use_matrix": False}], lr=0.01, adamw_lr=0.01, adamw_weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref, lr=0.01, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1)
    for k in range(5):
        for p, q in zip(ours, ref, strict=True):
            g = torch.randn(p.shape, generator=gen)
            # the second parameter has no gradient on the first two steps
            p.grad = g.clone() if (k >= 2 or p.ndim == 2) else None
            q.grad = g.clone() if (k >= 2 or q.ndim == 2) else None
        opt.step()
        ref_opt.step()
    assert opt.state[ours[0]]["step"] == 5 and opt.state[ours[1]]["step"] == 3
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_apply_update_scale_and_narrow_update() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4, 6, generator=gen)
    u = torch.randn(4, 6, generator=gen).bfloat16()
    expected = w * (1 - 0.1 * 0.5) - 0.1 * 3.0 * u.float()
    apply_update_(w, u, 0.1, 0.5, update_scale=3.0)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-6)
    # a bf16 weight with an fp32 update: fp32 arithmetic, one rounding
    wb = torch.randn(4, 6, generator=gen).bfloat16()
    uf = torch.randn(4, 6, generator=gen)
    expected_b = ((wb.float() - 0.1 * 2.0 * uf) * (1 - 0.1 * 0.5)).bfloat16()
    apply_update_(wb, uf, 0.1, 0.5, decay_first=False, update_scale=2.0)
    assert torch.equal(wb, expected_b)


@pytest.mark.parametrize("stack", [True, False, None])
def test_map_batched_stack_policies_agree(stack: bool | None) -> None:
    gen = torch.Generator().manual_seed(3)
    mats = [torch.randn(6, 9, generator=gen) for _ in range(3)] + [torch.randn(9, 6, generator=gen)]
    out = map_batched(lambda X: newton_schulz(X, 5, compute_dtype=torch.float64), mats, stack=stack)
    for mat, o in zip(mats, out, strict=True):
        torch.testing.assert_close(o, newton_schulz(mat, 5, compute_dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_map_batched_stacking_casts_once() -> None:
    gen = torch.Generator().manual_seed(4)
    mats = [torch.randn(5, 8, generator=gen) for _ in range(3)]
    seen: list[torch.dtype] = []

    def kernel(X: torch.Tensor) -> torch.Tensor:
        seen.append(X.dtype)
        return X * 2

    out = map_batched(kernel, mats, stack=True, dtype=torch.bfloat16)
    assert seen == [torch.bfloat16]  # one call, on the stacked batch in the requested dtype
    for mat, o in zip(mats, out, strict=True):
        assert torch.equal(o, mat.bfloat16() * 2)
    assert not stacking_helps(torch.device("cpu"))


def test_bf16_muon_matches_torch_muon_on_fp32_weights() -> None:
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    gen = torch.Generator().manual_seed(5)
    ours = [torch.randn(12, 20, generator=gen), torch.randn(20, 12, generator=gen)]
    ref = [p.clone() for p in ours]
    opt = whiten.Muon(ours, lr=0.02, weight_decay=0.1, ns_dtype="bfloat16")
    ref_opt = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1)
    for _ in range(3):
        for p, q in zip(ours, ref, strict=True):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref, strict=True):
        assert p.dtype == torch.float32
        # the bf16 iterations agree to bf16 resolution of the update (lr * ~1)
        torch.testing.assert_close(p, q, rtol=0, atol=0.02 * 2**-7 * 4)


@pytest.mark.parametrize("shape", [(6, 20), (20, 6), (3, 8, 24)])
def test_gram_newton_schulz_is_the_same_polynomial(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(6)
    G = torch.randn(shape, dtype=torch.float64, generator=gen)
    for coefficients in ("keller", "polar_express"):
        direct = newton_schulz(G, 5, coefficients, compute_dtype=torch.float64, method="direct")
        for method in ("gram", "spectral"):
            other = newton_schulz(G, 5, coefficients, compute_dtype=torch.float64, method=method)
            torch.testing.assert_close(other, direct, rtol=1e-10, atol=1e-10)
    # zero input stays zero (the eps floor of the normaliser)
    for method in ("gram", "spectral"):
        assert torch.equal(newton_schulz(torch.zeros(4, 9), method=method), torch.zeros(4, 9))
    with pytest.raises(ValueError, match="spectral"):
        newton_schulz(G, compute_dtype=torch.bfloat16, method="spectral")


@pytest.mark.parametrize("steps", range(1, 9))
@pytest.mark.parametrize("shape", [(6, 20), (20, 6), (3, 8, 24)])
def test_gram_newton_schulz_equals_the_left_factor_formula(shape: tuple[int, ...], steps: int) -> None:
    """One Gram path for every step count: up to GRAM_SEGMENT steps it is K X with K the left factor."""
    from whiten.linalg import newton_schulz_left_factor

    gen = torch.Generator().manual_seed(11)
    G = torch.randn(shape, dtype=torch.float64, generator=gen)
    wide = G if shape[-2] <= shape[-1] else G.mT
    for coefficients in ("keller", "polar_express"):
        K, _ = newton_schulz_left_factor(wide, steps, coefficients)
        expected = K @ wide if shape[-2] <= shape[-1] else (K @ wide).mT
        got = newton_schulz(G, steps, coefficients, compute_dtype=torch.float64, method="gram")
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        direct = newton_schulz(G, steps, coefficients, compute_dtype=torch.float64, method="direct")
        torch.testing.assert_close(got, direct, rtol=1e-10, atol=1e-10)


def test_auto_method_choice_and_bad_method() -> None:
    from whiten.linalg import prefers_gram

    assert prefers_gram((768, 3072), torch.float32) and prefers_gram((3072, 768), torch.float64)
    assert not prefers_gram((768, 768), torch.float32) and not prefers_gram((768, 1000), torch.float32)
    assert not prefers_gram((768, 3072), torch.bfloat16)
    with pytest.raises(ValueError, match="method"):
        newton_schulz(torch.randn(3, 5), method="fast")
    with pytest.raises(ValueError, match="ns_method"):
        whiten.Muon([torch.nn.Parameter(torch.randn(3, 5))], ns_method="fast")


def test_muon_ns_methods_agree_in_fp32() -> None:
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(16, 40, generator=gen), torch.randn(40, 16, generator=gen), torch.randn(16, 16, generator=gen)]
    results = {}
    for method in ("direct", "gram", "spectral", "auto"):
        params = [p.clone() for p in init]
        opt = whiten.Muon(params, lr=0.02, ns_method=method, matmul_dtype="float32")
        g = torch.Generator().manual_seed(8)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results[method] = params
    for method in ("gram", "spectral", "auto"):
        for a, b in zip(results[method], results["direct"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 3])
def test_sorted_orthogonal_iteration_equals_sort_then_iterate(steps: int) -> None:
    from whiten.linalg import orthogonal_iteration, sort_basis, sorted_orthogonal_iteration

    gen = torch.Generator().manual_seed(9)
    X = torch.randn(2, 12, 30, dtype=torch.float64, generator=gen)
    A = X @ X.mT
    Q, _ = torch.linalg.qr(torch.randn(2, 12, 12, dtype=torch.float64, generator=gen))
    sorted_Q, order_ref = sort_basis(A, Q)
    expected = orthogonal_iteration(A, sorted_Q, steps)
    got, order = sorted_orthogonal_iteration(A, Q, steps)
    assert torch.equal(order, order_ref)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="steps"):
        sorted_orthogonal_iteration(A, Q, 0)


def test_compile_ns_routes_newton_schulz_through_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    # dynamo really traces newton_schulz here; the "eager" backend skips inductor's C++ build (CI time)
    from whiten.linalg import compiled_newton_schulz

    compiled: list[object] = []
    real_compile = torch.compile

    def eager_compile(fn, **kwargs):
        compiled.append(fn)
        return real_compile(fn, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager_compile)
    compiled_newton_schulz.cache_clear()
    try:
        gen = torch.Generator().manual_seed(11)
        init = [torch.randn(16, 40, generator=gen), torch.randn(24, 24, generator=gen)]
        grads = [[torch.randn(p.shape, generator=gen) for p in init] for _ in range(3)]
        results = {}
        for flag in (False, True):
            params = [p.clone() for p in init]
            opt = whiten.Muon(params, lr=0.02, compile_ns=flag)
            for step_grads in grads:
                for p, g in zip(params, step_grads, strict=True):
                    p.grad = g.clone()
                opt.step()
            results[flag] = params
        assert compiled == [newton_schulz]  # built once, only when asked for
        for a, b in zip(results[True], results[False], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        with pytest.raises(ValueError, match="compile_ns"):
            whiten.HTMuon([torch.nn.Parameter(torch.randn(3, 5))], lr=0.03, compile_ns="yes")
    finally:
        compiled_newton_schulz.cache_clear()
