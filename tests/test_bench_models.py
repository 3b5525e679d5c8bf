"""Benchmark models: parameter counts, causality, RoPE, tying, named sizes."""

from __future__ import annotations

import pytest
import torch

from whiten import split_parameters
from whiten.bench.models import (
    MODEL_CONFIGS,
    ModelConfig,
    apply_rope,
    build_model,
    count_parameters,
    model_config,
    rope_tables,
)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_parameter_count_formula_matches_the_built_model(name):
    config = model_config(name, vocab_size=300, ctx=32)
    model = build_model(config, seed=0)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    untied = ModelConfig(config.arch, 2, 2, 16, 8, tie_weights=not config.tie_weights, vocab_size=50)
    assert count_parameters(untied) == sum(p.numel() for p in build_model(untied, seed=0).parameters())


def test_named_sizes_have_their_nominal_parameter_counts():
    # GPT-2 small / medium with the 50257-token vocabulary and tied head (Radford et al. 2019)
    assert count_parameters(model_config("gpt2-124m", vocab_size=50257)) == 124_439_808
    assert abs(count_parameters(model_config("gpt2-350m", vocab_size=50257)) / 1e6 - 354.8) < 0.1
    # LLaMA sizes quoted with a 32000-token vocabulary and untied head
    assert abs(count_parameters(model_config("llama-134m", vocab_size=32000)) / 1e6 - 134) < 0.5
    assert abs(count_parameters(model_config("llama-450m", vocab_size=32000)) / 1e6 - 450) < 1
    assert 0.15e6 < count_parameters(model_config("gpt-tiny", vocab_size=256)) < 0.3e6
    assert 0.8e6 < count_parameters(model_config("gpt-mini", vocab_size=256)) < 0.9e6
    assert 9e6 < count_parameters(model_config("gpt-small", vocab_size=256)) < 12e6
    with pytest.raises(ValueError, match="--model"):
        model_config("gpt-huge", vocab_size=256)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_model_is_causal_and_seeded(name):
    config = model_config(name, vocab_size=64, ctx=16)
    model = build_model(config, seed=1).eval()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 64
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    again = build_model(config, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(), strict=True))
    targets = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert loss is not None and abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.3  # ~uniform at init


def test_rope_preserves_norms_and_depends_on_relative_position():
    cos, sin = rope_tables(32, 8, 10000.0)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=gen), torch.randn(8, generator=gen)

    def at(x: torch.Tensor, pos: int) -> torch.Tensor:
        return apply_rope(x.view(1, 1, 1, 8), cos[pos : pos + 1], sin[pos : pos + 1]).view(8)

    assert torch.allclose(at(q, 5).norm(), q.norm(), atol=1e-6)
    assert torch.allclose(at(q, 0), q)
    # <R_m q, R_n k> depends on m - n only
    assert torch.allclose(at(q, 7) @ at(k, 3), at(q, 20) @ at(k, 16), atol=1e-5)


def test_tied_head_and_parameter_routing():
    gpt = build_model(model_config("gpt-tiny", vocab_size=64, ctx=16), seed=0)
    assert gpt.lm_head.weight is gpt.embed.weight
    llama = build_model(model_config("llama-tiny", vocab_size=64, ctx=16), seed=0)
    assert llama.lm_head.weight is not llama.embed.weight
    matrix, adamw = split_parameters(llama, embeddings_and_head="adamw")
    matrix_names = {n for n, _ in matrix}
    assert "lm_head.weight" not in matrix_names and "embed.weight" not in matrix_names
    assert "blocks.0.attn.q.weight" in matrix_names and "blocks.0.mlp.gate.weight" in matrix_names
    assert all(p.ndim == 1 or n in ("embed.weight", "lm_head.weight") for n, p in adamw)
    assert set(MODEL_CONFIGS) >= {"gpt2-124m", "gpt2-350m", "llama-134m", "llama-450m"}
