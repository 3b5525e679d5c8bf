"""The matrix optimizers' one precision policy: ``matmul_dtype`` (whiten.linalg.matmuls_in / full_precision)."""

from __future__ import annotations

import pytest
import torch

from whiten.linalg import check_matmul_dtype, full_precision, matmul_compute_dtype, matmuls_in


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
