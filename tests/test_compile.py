"""``torch.compile(optimizer.step)`` equals eager (issue 14, items 1-2); the full inductor check is
``make compile-check`` (``tests/compile_check.py``)."""

import pytest
import torch

from compile_check import relative_difference
from whiten.optim._adamw import apply_update_, decay_and_update_


@pytest.mark.parametrize("name", ["muon", "soap", "kl-shampoo"])  # every optimizer: make compile-check
def test_compiled_step_equals_eager(name):
    # the model has biases and a LayerNorm gain: the AdamW half's fused kernel used to fail to compile
    assert relative_difference(name, steps=3, backend="aot_eager") < 1e-10


def test_update_kernels_compile_with_inductor():
    # inductor (torch 2.13, CPU) dropped alpha in param.add_(A @ B, alpha=-lr): a step 1/lr too large
    def step(p_muon, p_soap, a, b):
        apply_update_(p_muon, a @ b, 0.01, 0.1)
        decay_and_update_(p_soap, a @ b, alpha=-0.01, decay=0.999, decay_first=False)

    gen = torch.Generator().manual_seed(0)
    p, a, b = torch.randn(6, 5, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(4, 5, generator=gen)
    eager = [p.clone(), p.clone()]
    step(*eager, a, b)
    compiled = [p.clone(), p.clone()]
    torch.compile(step, backend="inductor")(*compiled, a, b)
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)
