"""Decoder-only language models for the benchmark: GPT-2 style and LLaMA style, by name.

* ``gpt``: learned absolute positions, pre-LayerNorm blocks, GELU MLP with 4x width, biases,
  output head optionally tied to the token embedding (GPT-2, Radford et al. 2019).
* ``llama``: rotary position embedding (RoPE, Su et al. 2021) on queries and keys, RMSNorm
  (Zhang & Sennrich 2019), SwiGLU MLP (Shazeer 2020), no biases, untied head by default
  (Touvron et al. 2023).

Both use ``F.scaled_dot_product_attention(is_causal=True)`` and separate ``q``/``k``/``v``
projections, so every attention matrix is its own ``d x d`` parameter for the matrix methods.
Initialisation: ``N(0, 0.02)`` everywhere, residual output projections scaled by
``1/sqrt(2 n_layer)`` (GPT-2's rule).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one benchmark model (``vocab_size`` is set from the tokenizer)."""

    arch: str  # "gpt" or "llama"
    n_layer: int
    n_head: int
    d_model: int
    ctx: int  # maximum context length (learned positions / RoPE table)
    d_ff: int | None = None  # MLP hidden width; None -> 4 d (gpt) or 8/3 d rounded up to 32 (llama)
    tie_weights: bool | None = None  # None -> True for gpt, False for llama
    vocab_size: int = 256
    rope_base: float = 10000.0

    def resolved(self) -> ModelConfig:
        """The config with every ``None`` filled in by the architecture's rule."""
        if self.arch not in ("gpt", "llama"):
            raise ValueError(f"arch={self.arch!r} is not valid; use 'gpt' or 'llama'")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        d_ff = self.d_ff
        if d_ff is None:
            d_ff = 4 * self.d_model if self.arch == "gpt" else 32 * math.ceil(8 * self.d_model / 3 / 32)
        tie = self.tie_weights if self.tie_weights is not None else self.arch == "gpt"
        return replace(self, d_ff=d_ff, tie_weights=tie)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self.resolved())


# Named sizes. The paper-scale names follow GPT-2 (124M, 350M; vocab 50257, tied) and the
# LLaMA sizes used in the KL-Shampoo / Pro-KLShampoo papers (nominal counts with a 32000-token
# vocabulary, untied; with the GPT-2 tokenizer the embedding part grows accordingly).
MODEL_CONFIGS: dict[str, ModelConfig] = {
    "gpt-tiny": ModelConfig("gpt", n_layer=4, n_head=4, d_model=64, ctx=128),
    "gpt-mini": ModelConfig("gpt", n_layer=4, n_head=4, d_model=128, ctx=128),
    "gpt-small": ModelConfig("gpt", n_layer=6, n_head=6, d_model=384, ctx=256),
    "llama-tiny": ModelConfig("llama", n_layer=4, n_head=4, d_model=64, ctx=128),
    "llama-mini": ModelConfig("llama", n_layer=4, n_head=4, d_model=128, ctx=128),
    "llama-small": ModelConfig("llama", n_layer=6, n_head=6, d_model=384, ctx=256),
    "gpt2-124m": ModelConfig("gpt", n_layer=12, n_head=12, d_model=768, ctx=1024),
    "gpt2-350m": ModelConfig("gpt", n_layer=24, n_head=16, d_model=1024, ctx=1024),
    "llama-134m": ModelConfig("llama", n_layer=12, n_head=12, d_model=768, ctx=1024, d_ff=2048),
    "llama-450m": ModelConfig("llama", n_layer=24, n_head=16, d_model=1024, ctx=1024, d_ff=3840),
}


def model_config(name: str, *, vocab_size: int, ctx: int | None = None) -> ModelConfig:
    """Look up a named size; ``ctx`` overrides the context length."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"--model {name!r} is not known; choose one of {', '.join(MODEL_CONFIGS)}")
    config = MODEL_CONFIGS[name]
    if ctx is not None:
        config = replace(config, ctx=ctx)
    return replace(config, vocab_size=vocab_size).resolved()


def count_parameters(config: ModelConfig) -> int:
    """Number of trainable parameters of ``build_model(config)``, computed without building it."""
    c = config.resolved()
    d, f, v = c.d_model, c.d_ff, c.vocab_size
    assert f is not None
    head = 0 if c.tie_weights else v * d
    if c.arch == "gpt":
        per_layer = 2 * 2 * d + 4 * (d * d + d) + (d * f + f) + (f * d + d)  # 2 LN, q k v o, fc, proj
        return v * d + c.ctx * d + c.n_layer * per_layer + 2 * d + head
    per_layer = 2 * d + 4 * d * d + 3 * d * f  # 2 RMSNorm gains, q k v o, gate up down
    return v * d + c.n_layer * per_layer + d + head


class RMSNorm(nn.Module):
    """``x / rms(x) * g`` (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(ctx: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables of shape ``(ctx, head_dim/2)`` for rotary embeddings."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(ctx, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair ``(x[2i], x[2i+1])`` of ``x`` (``B, H, T, Dh``) by the position angle."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        bias = config.arch == "gpt"
        d = config.d_model
        self.n_head = config.n_head
        self.q = nn.Linear(d, d, bias=bias)
        self.k = nn.Linear(d, d, bias=bias)
        self.v = nn.Linear(d, d, bias=bias)
        self.o = nn.Linear(d, d, bias=bias)
        self.o.residual = True  # type: ignore[assignment]  # marks the scaled init

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        B, T, d = x.shape
        shape = (B, T, self.n_head, d // self.n_head)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.q, self.k, self.v))
        if rope is not None:
            cos, sin = rope[0][:T], rope[1][:T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, d))


class GeluMLP(nn.Module):
    def __init__(self, d: int, d_ff: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d_ff)
        self.proj = nn.Linear(d_ff, d)
        self.proj.residual = True  # type: ignore[assignment]

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class SwiGLU(nn.Module):
    def __init__(self, d: int, d_ff: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d, d_ff, bias=False)
        self.up = nn.Linear(d, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d, bias=False)
        self.down.residual = True  # type: ignore[assignment]

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.d_ff is not None
        norm = nn.LayerNorm if config.arch == "gpt" else RMSNorm
        self.norm1 = norm(config.d_model)
        self.attn = Attention(config)
        self.norm2 = norm(config.d_model)
        self.mlp = GeluMLP(config.d_model, config.d_ff) if config.arch == "gpt" else SwiGLU(config.d_model, config.d_ff)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class DecoderLM(nn.Module):
    """A decoder-only LM; ``forward(idx, targets)`` returns logits and, given targets, the mean loss."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config = config.resolved()
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        self.pos_embed = nn.Embedding(config.ctx, d) if config.arch == "gpt" else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.LayerNorm(d) if config.arch == "gpt" else RMSNorm(d)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.embed.weight
        if config.arch == "llama":
            cos, sin = rope_tables(config.ctx, d // config.n_head, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                std = residual_std if getattr(module, "residual", False) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        T = idx.shape[1]
        if self.config.ctx < T:
            raise ValueError(f"sequence length {T} exceeds the model context {self.config.ctx}")
        x = self.embed(idx)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(T, device=idx.device))
        else:
            rope = (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            x = block(x, rope)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss


def build_model(config: ModelConfig, *, seed: int, device: str | torch.device = "cpu") -> DecoderLM:
    """Build a model with weights drawn from ``seed`` (the same for every optimizer)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DecoderLM(config)
    return model.to(device)
