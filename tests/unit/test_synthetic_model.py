"""bench/synthetic_model.py: the tensor layout of a Q4_K_M Genstruct-7B, and a written file
that reads back with that layout, Mistral's vocabulary and the same bytes for the same seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

from bench import synthetic_model as sm  # noqa: E402  (needs gguf)

N_VOCAB = 32000


def layout_bytes(shape: sm.Shape) -> tuple[int, int]:
    """(tensor bytes, parameters) of a shape's layout."""
    total = params = 0
    for _, (ne0, ne1), kind in sm.tensors(shape, N_VOCAB):
        block, size = gguf.GGML_QUANT_SIZES[kind]
        total += ne0 * ne1 // block * size
        params += ne0 * ne1
    return total, params


def test_the_full_shape_is_genstruct_7b_at_q4_k_m() -> None:
    total, params = layout_bytes(sm.GENSTRUCT_7B)
    assert params == 7_241_732_096  # Mistral-7B-v0.1's parameter count
    # a Q4_K_M file of it: 4.37 GB of tensors (the rest of the file is metadata)
    assert 4_360_000_000 < total < 4_370_000_000
    kinds = {name: kind for name, _, kind in sm.tensors(sm.GENSTRUCT_7B, N_VOCAB)}
    assert kinds["output.weight"] == sm.Q6_K and kinds["token_embd.weight"] == sm.Q4_K
    six = [i for i in range(32) if kinds[f"blk.{i}.ffn_down.weight"] == sm.Q6_K]
    assert six == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert all(kinds[f"blk.{i}.attn_v.weight"] == kinds[f"blk.{i}.ffn_down.weight"]
               for i in range(32))
    assert {kinds[f"blk.{i}.attn_q.weight"] for i in range(32)} == {sm.Q4_K}


def test_fewer_layers_keep_each_layers_shape() -> None:
    full = {n: s for n, s, _ in sm.tensors(sm.GENSTRUCT_7B, N_VOCAB)}
    four = {n: s for n, s, _ in sm.tensors(sm.Shape(n_layer=4), N_VOCAB)}
    assert all(full[name] == shape for name, shape in four.items())
    assert len(four) == 3 + 4 * 9


def test_the_tiny_file_reads_back_with_mistrals_vocabulary(tmp_path: Path) -> None:
    path = sm.write(sm.TINY, tmp_path / "tiny.gguf", seed=7)
    reader = gguf.GGUFReader(path)
    fields = reader.fields

    def value(key: str) -> object:
        field = fields[key]
        return field.contents()

    assert value("general.architecture") == "llama"
    assert value("llama.block_count") == 2
    assert value("llama.attention.head_count_kv") == 1
    assert value("tokenizer.ggml.model") == "llama"
    assert value("tokenizer.ggml.bos_token_id") == 1 and value("tokenizer.ggml.eos_token_id") == 2
    tokens = value("tokenizer.ggml.tokens")
    assert isinstance(tokens, list) and len(tokens) == N_VOCAB
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3] == "<0x00>"
    written = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type) for t in reader.tensors}
    expected = {n: ((ne0,) if k == sm.F32 else (ne0, ne1), k)
                for n, (ne0, ne1), k in sm.tensors(sm.TINY, N_VOCAB)}
    assert written == expected
    again = sm.write(sm.TINY, tmp_path / "again.gguf", seed=7)
    other = sm.write(sm.TINY, tmp_path / "other.gguf", seed=8)
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest()

    def weights(p: Path) -> bytes:  # the tensors only: the name in the metadata has the seed
        return b"".join(bytes(t.data) for t in gguf.GGUFReader(p).tensors)

    assert weights(other) != weights(path)
