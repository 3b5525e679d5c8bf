"""The matrix optimizers' one precision policy: ``matmul_dtype`` (whiten.linalg.matmuls_in / full_precision)."""

from __future__ import annotations

import copy

import pytest
import torch

from whiten.linalg import (
    check_matmul_dtype,
    effective_matmul_dtype,
    full_precision,
    matmul_compute_dtype,
    matmuls_in,
    stacking_helps,
)
from whiten.linalg.precision import CPU_BF16_MIN_NUMEL


def test_bfloat16_policy_lowers_fp32_products_only_and_decompositions_stay_full_precision():
    a, a64 = torch.randn(8, 8), torch.randn(8, 8, dtype=torch.float64)
    with matmuls_in("bfloat16", "cpu"):
        assert (a @ a).dtype == torch.bfloat16
        assert torch.bmm(a[None], a[None]).dtype == torch.bfloat16
        assert (a64 @ a64).dtype == torch.float64  # fp64 statistics are never lowered
        assert ((a @ a) * a).dtype == torch.float32  # elementwise with fp32 promotes back
        with full_precision("cpu"):
            assert (a @ a).dtype == torch.float32
            assert torch.linalg.qr(a @ a).Q.dtype == torch.float32
    assert (a @ a).dtype == torch.float32


def test_float32_policy_switches_a_surrounding_autocast_off():
    a = torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with matmuls_in("float32", torch.device("cpu")):
            assert (a @ a).dtype == torch.float32


def test_compute_dtype_and_validation():
    assert matmul_compute_dtype("bfloat16", torch.float32) == torch.bfloat16
    assert matmul_compute_dtype("bfloat16", torch.float64) == torch.float64
    assert matmul_compute_dtype("float32", torch.float32) == torch.float32
    with pytest.raises(ValueError, match="matmul_dtype='fp16' is not valid; use one of \\('float32', 'bfloat16'\\)"):
        check_matmul_dtype("fp16")


# -- the option on every matrix optimizer ---------------------------------------------------------

from whiten.optim import KLSOAP, REKLS, SOAP, HTMuon, KLShampoo, Muon, ProKLShampoo  # noqa: E402
from whiten.optim.pro_kl_shampoo import default_ns_method  # noqa: E402

CLASSES = [
    (Muon, {"lr": 0.02}),
    (HTMuon, {"lr": 0.03, "spectral_map": "ns"}),
    (SOAP, {"lr": 1e-3, "precondition_frequency": 2}),
    (SOAP, {"lr": 1e-3, "precondition_frequency": 2, "use_kl_shampoo": True}),
    (REKLS, {"lr": 1e-3}),
    (KLShampoo, {"lr": 1e-3, "precondition_frequency": 2}),
    (KLSOAP, {"lr": 1e-3, "precondition_frequency": 2}),
    (ProKLShampoo, {"lr": 1e-3, "precondition_frequency": 2, "rank": 4}),
]
#: the classes that keep fp32 by default (docs/precision.md: SOAP's basis on near-degenerate spectra)
FP32_DEFAULT = (SOAP,)
IDS = [f"{cls.__name__}{'-kl' if o.get('use_kl_shampoo') else ''}" for cls, o in CLASSES]


def _run(cls, options, dtype=torch.float32, steps=4, context=None, **extra):
    gen = torch.Generator().manual_seed(0)
    # above CPU_BF16_MIN_NUMEL entries: smaller matrices keep fp32 products on CPU (effective_matmul_dtype)
    W = torch.nn.Parameter(torch.randn(160, 480, generator=gen, dtype=dtype) * 0.1)
    opt = cls([W], **options, **extra)
    for _ in range(steps):
        W.grad = torch.randn(W.shape, generator=gen, dtype=dtype)
        if context is None:
            opt.step()
        else:
            with context():
                opt.step()
    return W.detach().clone(), opt


@pytest.mark.parametrize(("cls", "options"), CLASSES, ids=IDS)
def test_bf16_hot_matmuls_keep_fp32_state_and_the_defaults(cls, options):
    default = "float32" if issubclass(cls, FP32_DEFAULT) else "bfloat16"
    assert cls([torch.nn.Parameter(torch.zeros(3, 3))], **options).defaults["matmul_dtype"] == default
    fast, opt = _run(cls, options, matmul_dtype="bfloat16")
    exact, _ = _run(cls, options, matmul_dtype="float32")
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    for key, value in opt.state[next(iter(opt.state))].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert value.dtype == torch.float32, key  # accumulation and state stay fp32
    assert not torch.equal(fast, exact)  # the products really ran in bf16 ...
    if issubclass(cls, FP32_DEFAULT):
        return  # random gradients: a near-degenerate spectrum, whose QR-refreshed basis round-off moves freely
    start = _run(cls, options, steps=0)[0]
    moved = (exact - start).norm()
    assert (fast - exact).norm() < 0.1 * moved  # ... and the step is the same step to bf16 rounding


@pytest.mark.parametrize(("cls", "options"), CLASSES, ids=IDS)
def test_fp64_parameters_are_never_lowered(cls, options):
    fast, _ = _run(cls, options, dtype=torch.float64, matmul_dtype="bfloat16")
    exact, _ = _run(cls, options, dtype=torch.float64, matmul_dtype="float32")
    torch.testing.assert_close(fast, exact, rtol=0, atol=0)


@pytest.mark.parametrize(("cls", "options"), CLASSES, ids=IDS)
def test_float32_policy_is_not_lowered_by_a_surrounding_autocast(cls, options):
    """A step called inside the forward's autocast region: matmul_dtype="float32" still computes in fp32."""
    plain, _ = _run(cls, options, matmul_dtype="float32")
    inside, _ = _run(cls, options, matmul_dtype="float32", context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)


def test_ns_dtype_is_the_older_name_of_matmul_dtype_and_old_checkpoints_load():
    W = torch.nn.Parameter(torch.randn(6, 4))
    assert Muon([W], ns_dtype="float32").param_groups[0]["matmul_dtype"] == "float32"
    assert "ns_dtype" not in Muon([W], ns_dtype="float32").param_groups[0]
    assert Muon([{"params": [W], "ns_dtype": "float64"}]).param_groups[0]["matmul_dtype"] == "float64"
    with pytest.raises(ValueError, match="ns_dtype='float32' \\(the older name of matmul_dtype\\) contradicts"):
        Muon([W], ns_dtype="float32", matmul_dtype="float64")
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([W], ns_dtype="float16")
    # a checkpoint written when the option was ns_dtype (and fp32 by default) resumes in fp32
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(6, 4, generator=gen) for _ in range(4)]
    W1 = torch.nn.Parameter(torch.randn(6, 4, generator=gen))
    W2 = torch.nn.Parameter(W1.detach().clone())
    original = Muon([W1], lr=0.02, matmul_dtype="float32")
    for g in grads[:2]:
        W1.grad = g.clone()
        original.step()
    saved = copy.deepcopy(original.state_dict())  # not the live tensors: both optimizers step on
    saved["param_groups"][0]["ns_dtype"] = saved["param_groups"][0].pop("matmul_dtype")
    W2.data.copy_(W1.detach())
    resumed = Muon([W2], lr=0.02)  # today's default is bf16; the checkpoint's fp32 wins
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["matmul_dtype"] == "float32" and "ns_dtype" not in resumed.param_groups[0]
    for g in grads[2:]:
        W1.grad, W2.grad = g.clone(), g.clone()
        original.step()
        resumed.step()
    torch.testing.assert_close(W2, W1, rtol=0, atol=0)


def test_bad_matmul_dtype_names_the_option():
    for cls, options in CLASSES:
        with pytest.raises(ValueError, match="matmul_dtype"):
            cls([torch.nn.Parameter(torch.zeros(3, 3))], **options, matmul_dtype="float16")


def test_steps_do_not_revalidate_matmul_dtype(monkeypatch):
    """The option is checked once, when the group is built; the helpers inside each step only look it up."""
    import whiten.linalg.precision as precision

    def revalidated(*args, **kwargs):
        raise AssertionError("matmul_dtype re-validated inside a step")

    built = [
        (cls([torch.nn.Parameter(torch.randn(12, 30))], **options, matmul_dtype="bfloat16")) for cls, options in CLASSES
    ]
    monkeypatch.setattr(precision, "check_matmul_dtype", revalidated)
    for optimizer in built:
        for _ in range(2):
            for p in optimizer.param_groups[0]["params"]:
                p.grad = torch.randn(p.shape)
            optimizer.step()
    for helper in (
        lambda: matmuls_in("float16", "cpu").__enter__(),
        lambda: matmul_compute_dtype("float16", torch.float32),
    ):
        with pytest.raises(KeyError, match="float16"):  # a lookup, not a silent fp32
            helper()


def test_pro_klshampoo_ns_method_default_by_dtype_device_and_shape():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_ns_method(torch.float32, cpu, (768, 768)) == "spectral"
    assert default_ns_method(torch.float64, cpu, (768, 768)) == "spectral"
    assert default_ns_method(torch.bfloat16, cpu, (768, 3072)) == "spectral"  # wide: the fp32 eigh route pays
    assert default_ns_method(torch.bfloat16, cpu, (768, 768)) == "direct"
    assert default_ns_method(torch.float32, cuda, (768, 3072)) == "auto"
    assert default_ns_method(torch.bfloat16, cuda, (768, 768)) == "auto"
    W = torch.nn.Parameter(torch.randn(24, 40))
    assert ProKLShampoo([W], rank=4).defaults["ns_method"] is None


def test_small_matrices_keep_fp32_products_on_cpu_and_are_stacked():
    cpu = torch.device("cpu")
    assert effective_matmul_dtype("bfloat16", (256, 256), cpu) == "float32"  # the tiny and mini presets' sizes
    assert effective_matmul_dtype("bfloat16", (768, 768), cpu) == "bfloat16"
    assert effective_matmul_dtype("bfloat16", (4, 64, 64), torch.device("cuda")) == "bfloat16"
    assert effective_matmul_dtype("float32", (768, 768), cpu) == "float32"
    assert 256 * 256 <= CPU_BF16_MIN_NUMEL < 768 * 768
    assert stacking_helps(cpu, (64, 256)) and not stacking_helps(cpu, (768, 768)) and not stacking_helps(cpu)
    assert stacking_helps(torch.device("cuda"), (768, 768))
    # a small matrix under the bf16 policy steps exactly as under fp32 on CPU
    W1, W2 = (torch.nn.Parameter(torch.ones(32, 48) * 0.1) for _ in range(2))
    a, b = KLShampoo([W1], matmul_dtype="bfloat16"), KLShampoo([W2], matmul_dtype="float32")
    for k in range(3):
        g = torch.randn(32, 48, generator=torch.Generator().manual_seed(k))
        W1.grad, W2.grad = g.clone(), g.clone()
        a.step()
        b.step()
    torch.testing.assert_close(W1, W2, rtol=0, atol=0)
