"""A GGUF of Genstruct-7B's exact shape and tokenizer with random weights, for benchmarks.

Genstruct-7B is a Mistral-7B-v0.1 fine-tune: in GGUF the `llama` architecture, 32 layers,
hidden size 4096, feed-forward 14336, 32 attention heads over 8 KV heads, rope theta 10000
and Mistral's 32,000-token SentencePiece vocabulary. llama.cpp's speed does not depend on
what the weights are, so a file of that shape with random weights costs what the real one
costs: the same kernels, tensor types (Q4_K_M's mix of Q4_K and Q6_K), KV cache per token
and sampling over the same vocabulary. Random weights write random text.

The tokenizer is Mistral's own (`tokenizer.model.v1`, which the mistral-common wheel ships),
read with sentencepiece and written as llama.cpp's converter writes a SentencePiece vocab.
Files are written with `gguf`, the llama.cpp project's Python package, deterministically
from the seed, into the git-ignored `bench/.build/models/`.

    python -m bench.synthetic_model                  # the full shape (4.4 GB)
    python -m bench.synthetic_model --layers 4       # each layer full size, fewer of them
    python -m bench.synthetic_model --tiny           # 2 narrow layers, the same vocab (~12 MB)

Benchmarks take `--model synthetic` (the full shape), `synthetic:N` (N layers) or
`synthetic:tiny`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

BUILD_ROOT = Path(__file__).resolve().parent / ".build"
MODELS_DIR = BUILD_ROOT / "models"

# Mistral-7B-v0.1's tokenizer, as the mistral-common wheel ships it.
TOKENIZER_WHEEL = "mistral-common==1.13.1"
TOKENIZER_MEMBER = "mistral_common/data/tokenizer.model.v1"
TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
# Bump when the file layout changes, so cached files are rewritten.
FORMAT = 1


@dataclass(frozen=True)
class Shape:
    """A llama-architecture shape; the defaults are Genstruct-7B's (Mistral-7B-v0.1)."""

    n_layer: int = 32
    n_embd: int = 4096
    n_ff: int = 14336
    n_head: int = 32
    n_head_kv: int = 8
    context_length: int = 32768
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


GENSTRUCT_7B = Shape()
# Two narrow layers, the same grouped-query ratio and the same vocabulary: a few MB.
TINY = Shape(n_layer=2, n_embd=256, n_ff=768, n_head=4, n_head_kv=1, context_length=4096)


def _more_bits(layer: int, n_layer: int) -> bool:
    """Layers where Q4_K_M keeps attn_v and ffn_down at Q6_K (llama.cpp's use_more_bits)."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


Q4_K = gguf.GGMLQuantizationType.Q4_K
Q6_K = gguf.GGMLQuantizationType.Q6_K
F32 = gguf.GGMLQuantizationType.F32


TensorSpec = tuple[str, tuple[int, int], gguf.GGMLQuantizationType]


def tensors(shape: Shape, n_vocab: int) -> Iterator[TensorSpec]:
    """(name, (ne0, ne1), type) of every tensor, in file order, as a Q4_K_M file has them."""
    d, kv = shape.n_embd, shape.n_head_kv * shape.head_dim
    yield "token_embd.weight", (d, n_vocab), Q4_K
    for i in range(shape.n_layer):
        more = Q6_K if _more_bits(i, shape.n_layer) else Q4_K
        yield f"blk.{i}.attn_norm.weight", (d, 1), F32
        yield f"blk.{i}.attn_q.weight", (d, d), Q4_K
        yield f"blk.{i}.attn_k.weight", (d, kv), Q4_K
        yield f"blk.{i}.attn_v.weight", (d, kv), more
        yield f"blk.{i}.attn_output.weight", (d, d), Q4_K
        yield f"blk.{i}.ffn_norm.weight", (d, 1), F32
        yield f"blk.{i}.ffn_gate.weight", (d, shape.n_ff), Q4_K
        yield f"blk.{i}.ffn_up.weight", (d, shape.n_ff), Q4_K
        yield f"blk.{i}.ffn_down.weight", (shape.n_ff, d), more
    yield "output_norm.weight", (d, 1), F32
    yield "output.weight", (d, n_vocab), Q6_K


# Block scales chosen so that weights come out with a standard deviation near 0.02 (mean
# near 0): activations stay finite through every layer and the logits spread over the vocab.
_Q4K_D, _Q4K_DMIN = np.float16(8e-5), np.float16(6e-4)
_Q6K_D = np.float16(6e-5)


def random_blocks(kind: gguf.GGMLQuantizationType, ne0: int, ne1: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Random quantized rows of `kind` as raw bytes, shaped (ne1, bytes per row)."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    blocks = ne1 * ne0 // block
    data = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
    if kind == Q4_K:  # d, dmin (f16), scales[12], qs[128]
        data[:, 0:2] = np.frombuffer(_Q4K_D.tobytes(), np.uint8)
        data[:, 2:4] = np.frombuffer(_Q4K_DMIN.tobytes(), np.uint8)
    elif kind == Q6_K:  # ql[128], qh[64], scales[16] (int8), d (f16)
        data[:, 192:208] = rng.integers(-32, 33, size=(blocks, 16), dtype=np.int8).view(np.uint8)
        data[:, 208:210] = np.frombuffer(_Q6K_D.tobytes(), np.uint8)
    else:
        raise ValueError(kind)
    return data.reshape(ne1, ne0 // block * size)


def tokenizer_model(cache: Path = BUILD_ROOT / "tokenizer") -> Path:
    """Mistral's tokenizer.model, taken from the mistral-common wheel (pip, no install)."""
    target = cache / "mistral-tokenizer.model.v1"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary",
             ":all:", TOKENIZER_WHEEL, "-d", tmp],
            check=True,
        )
        (wheel,) = Path(tmp).glob("mistral_common-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(TOKENIZER_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != TOKENIZER_SHA256:
        raise RuntimeError(f"{TOKENIZER_MEMBER} has sha256 {digest}, not {TOKENIZER_SHA256}")
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.rename(target)
    return target


@dataclass(frozen=True)
class Vocab:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]


def read_vocab(path: Path) -> Vocab:
    """A SentencePiece model as GGUF's tokenizer.ggml.* arrays."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    kinds = gguf.TokenType
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            kind = kinds.UNKNOWN
        elif sp.is_control(i):
            kind = kinds.CONTROL
        elif sp.is_unused(i):
            kind = kinds.UNUSED
        elif sp.is_byte(i):
            kind = kinds.BYTE
        else:
            kind = kinds.NORMAL
        types.append(int(kind))
    return Vocab(tokens, scores, types)


def file_name(shape: Shape, seed: int) -> str:
    label = "tiny" if shape == TINY else f"L{shape.n_layer}"
    return f"genstruct-7b-shaped-{label}-s{seed}-f{FORMAT}.Q4_K_M.gguf"


def write(shape: Shape, path: Path, *, seed: int = 0, progress: bool = False) -> Path:
    """Write the model to `path` (atomically: a partial file never has the final name)."""
    vocab = read_vocab(tokenizer_model())
    n_vocab = len(vocab.tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, "llama")
    writer.add_name(f"Genstruct-7B shape, random weights (seed {seed}, {shape.n_layer} layers)")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    layout = list(tensors(shape, n_vocab))
    for name, (ne0, ne1), kind in layout:
        if kind == F32:
            writer.add_tensor_info(name, (ne0,), np.dtype(np.float32), ne0 * 4)
        else:
            block, size = gguf.GGML_QUANT_SIZES[kind]
            nbytes = ne1 * ne0 // block * size
            writer.add_tensor_info(name, (ne1, ne0 // block * size), np.dtype(np.uint8),
                                   nbytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for index, (name, (ne0, ne1), kind) in enumerate(layout):
        if kind == F32:
            writer.write_tensor_data(np.ones(ne0, dtype=np.float32))
        else:
            rng = np.random.default_rng([seed, index])
            writer.write_tensor_data(random_blocks(kind, ne0, ne1, rng))
        if progress and name.endswith("ffn_down.weight"):
            print(f"  {name}", file=sys.stderr, flush=True)
    writer.close()
    os.replace(partial, path)
    return path


def ensure(shape: Shape = GENSTRUCT_7B, *, seed: int = 0, progress: bool = False) -> Path:
    """The cached model of `shape`, written first if missing."""
    path = MODELS_DIR / file_name(shape, seed)
    if path.exists():
        return path
    return write(shape, path, seed=seed, progress=progress)


def shape_of(spec: str) -> Shape:
    """`synthetic`, `synthetic:N` (N full-size layers) or `synthetic:tiny`."""
    _, _, layers = spec.partition(":")
    if layers == "tiny":
        return TINY
    if not layers:
        return GENSTRUCT_7B
    return Shape(n_layer=int(layers))


def resolve(model: str) -> str:
    """A benchmark's --model: a synthetic short name becomes its (written) file."""
    if model == "synthetic" or model.startswith("synthetic:"):
        return str(ensure(shape_of(model), progress=True))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=GENSTRUCT_7B.n_layer,
                        help="layers of full size (default 32, the whole model)")
    parser.add_argument("--tiny", action="store_true",
                        help="2 narrow layers with the same vocabulary, for tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="where to write (default: the cache)")
    args = parser.parse_args(argv)
    shape = TINY if args.tiny else Shape(n_layer=args.layers)
    if args.out is not None:
        path = write(shape, args.out, seed=args.seed, progress=True)
    else:
        path = ensure(shape, seed=args.seed, progress=True)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
