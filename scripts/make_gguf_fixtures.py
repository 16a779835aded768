"""Tiny random-weight GGUF files, quantized by llama.cpp's own quantizer, and llama.cpp's greedy output
on each, kept as test data for `mlxserve import` (tests/engine/test_gguf_fixtures.py).

One file per architecture the importer supports (weights mixed as llama.cpp's Q4_K_M mixes them) and
one llama per K-quant type. Shapes are tiny (hidden 256: K-quants need rows of 256) but real: two
layers, grouped-query attention, each architecture's own tensors (biases, fused projections, Q/K
norms, Gemma's extra norms), a byte-level BPE or a SentencePiece vocabulary. Output weights are
large enough that the top two tokens are far apart, so greedy tokens do not hang on rounding.

llama.cpp's quantizer is `ggml_quantize_chunk` in the `xllamacpp` wheel; its server runs each file.
Run it once in a throwaway environment (it needs xllamacpp, gguf and numpy, not mlxserve):

    python3 -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install xllamacpp gguf numpy
    /tmp/llvenv/bin/python scripts/make_gguf_fixtures.py

It writes tests/data/gguf/*.gguf and tests/data/gguf/reference.json: for each file and prompt (token
ids, or text that llama.cpp tokenizes), the 20 greedy token ids and the log-probability llama.cpp gave
each (and for text, how many tokens the prompt was).

`requantize SOURCE DEST TYPE` rewrites a real model's GGUF in TYPE (Q4_K_M, Q6_K or Q8_0) with the same
quantizer, for scripts/perplexity.py: rows that are no multiple of 256 fall back as llama.cpp's
own `llama-quantize` makes them fall back (Q4_K to Q5_0, Q6_K to Q8_0).
"""

from __future__ import annotations

import ctypes
import json
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import xllamacpp
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, TokenType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fixtures.gguf_rewrite import rewrite_gguf  # noqa: E402  (gguf and numpy only)
from tests.fixtures.gguf_vocab import byte_tokens  # noqa: E402  (pure Python)

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "gguf"
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, CONTEXT, EXPERTS = 256, 256, 2, 4, 2, 512, 4
HEAD_DIM = HIDDEN // HEADS
MAX_TOKENS = 20
T = GGMLQuantizationType

_library = ctypes.CDLL(str(next(Path(xllamacpp.__file__).parent.glob("xllamacpp*.so"))))
_library.ggml_quantize_chunk.restype = ctypes.c_size_t
_library.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]


def quantize(values: np.ndarray, kind: GGMLQuantizationType) -> np.ndarray:
    """llama.cpp's own quantization of float32 rows (ggml_quantize_chunk, no importance matrix)."""
    rows, k = values.shape
    elements, size = GGML_QUANT_SIZES[kind]
    src = np.ascontiguousarray(values, dtype=np.float32)
    dst = np.zeros((rows, k // elements * size), dtype=np.uint8)
    _library.ggml_quantize_init(int(kind))
    written = _library.ggml_quantize_chunk(int(kind), src.ctypes.data, dst.ctypes.data, 0, rows, k, None)
    assert written == dst.nbytes, (kind, written, dst.nbytes)
    return dst


def bpe_vocabulary(pre: str = "qwen2") -> dict:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n"]
    tokens = specials + byte_tokens() + [m.replace(" ", "") for m in merges]
    types = [TokenType.CONTROL] * len(specials) + [TokenType.NORMAL] * (len(tokens) - len(specials))
    readable = [len(t) > 1 or 0x20 <= b < 0x7F for t, b in zip(tokens, [0] * len(specials) + list(range(256)) + [
        0x20] * len(merges))]
    readable[:len(specials)] = [False] * len(specials)
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges, "scores": None,
            "bos": 0, "eos": 2, "add_bos": False, "readable": readable}


def spm_vocabulary(gemma: bool = False, phi3: bool = False) -> dict:
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if gemma else ["<unk>", "<s>", "</s>"]
    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces = list(dict.fromkeys(["▁", "▁t", "▁a", "he", "in", "er", "on", "▁the", *letters,
                                 *("▁" + c for c in letters)]))
    markers = ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>"] if phi3 else []  # llama.cpp looks them up
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces + markers
    types = ([TokenType.CONTROL] * len(specials) + [TokenType.BYTE] * 256 + [TokenType.NORMAL] * len(pieces)
             + [TokenType.CONTROL] * len(markers))
    types[specials.index("<unk>")] = TokenType.UNKNOWN
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(pieces))] + [0.0] * len(markers)
    ids = {"bos": specials.index("<bos>" if gemma else "<s>"), "eos": specials.index("<eos>" if gemma else "</s>")}
    readable = [t == TokenType.NORMAL or (t == TokenType.BYTE and 0x20 <= b < 0x7F)
                for t, b in zip(types, [0] * len(specials) + list(range(256)) + [0] * (len(pieces) + len(markers)))]
    return {"model": "llama", "pre": "default", "tokens": tokens, "types": types, "merges": None, "scores": scores,
            "add_bos": True, "readable": readable, **ids}


def _weights(arch: str, readable: list[bool], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights; the output rows of tokens that are not whole printable text are shrunk, so that
    greedy output is text (llama.cpp holds back the log-probabilities of a partial UTF-8 character)."""
    def dense(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(size: int) -> np.ndarray:  # Gemma's files store 1 + w
        return (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32)

    vocab, shrink = len(readable), np.where(readable, 1.0, 0.05).astype(np.float32)[:, None]
    embedding = rng.standard_normal((vocab, HIDDEN)).astype(np.float32)
    tensors = {"token_embd.weight": embedding * shrink if arch.startswith("gemma") else embedding,
               "output_norm.weight": norm(HIDDEN)}
    if not arch.startswith("gemma"):  # Gemma's output layer is its embedding
        tensors["output.weight"] = rng.standard_normal((vocab, HIDDEN)).astype(np.float32) * shrink
    for i in range(layers(arch)):
        p = f"blk.{i}."
        q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        if arch == "phi3":
            tensors[p + "attn_qkv.weight"] = dense(q + 2 * kv, HIDDEN)
            tensors[p + "ffn_up.weight"] = dense(2 * FFN, HIDDEN)
        elif arch == "qwen3moe":  # experts stacked, and a float32 router as llama.cpp's converter keeps it
            tensors |= {p + "attn_q.weight": dense(q, HIDDEN), p + "attn_k.weight": dense(kv, HIDDEN),
                        p + "attn_v.weight": dense(kv, HIDDEN),
                        p + "ffn_gate_inp.weight": dense(EXPERTS, HIDDEN) * 4,
                        p + "ffn_gate_exps.weight": np.stack([dense(FFN, HIDDEN) for _ in range(EXPERTS)]),
                        p + "ffn_up_exps.weight": np.stack([dense(FFN, HIDDEN) for _ in range(EXPERTS)]),
                        p + "ffn_down_exps.weight": np.stack([dense(HIDDEN, FFN) for _ in range(EXPERTS)])}
        else:
            tensors |= {p + "attn_q.weight": dense(q, HIDDEN), p + "attn_k.weight": dense(kv, HIDDEN),
                        p + "attn_v.weight": dense(kv, HIDDEN), p + "ffn_gate.weight": dense(FFN, HIDDEN),
                        p + "ffn_up.weight": dense(FFN, HIDDEN)}
        tensors |= {p + "attn_output.weight": dense(HIDDEN, q), p + "attn_norm.weight": norm(HIDDEN),
                    p + "ffn_norm.weight": norm(HIDDEN)}
        if arch != "qwen3moe":
            tensors[p + "ffn_down.weight"] = dense(HIDDEN, FFN)
        if arch == "qwen2":
            tensors |= {p + f"attn_{n}.bias": 0.1 * rng.standard_normal(size).astype(np.float32)
                        for n, size in (("q", q), ("k", kv), ("v", kv))}
        if arch in ("qwen3", "qwen3moe", "gemma3"):
            tensors |= {p + "attn_q_norm.weight": norm(HEAD_DIM), p + "attn_k_norm.weight": norm(HEAD_DIM)}
        if arch.startswith("gemma"):
            tensors |= {p + "post_attention_norm.weight": norm(HIDDEN), p + "post_ffw_norm.weight": norm(HIDDEN)}
    return tensors


def layers(arch: str) -> int:
    return 6 if arch == "gemma3" else LAYERS  # Gemma 3 has a global layer every sixth: one at least


def q4_k_m(name: str) -> GGMLQuantizationType:
    """llama.cpp's Q4_K_M mix, simplified: Q6_K for the output layer, V and the down projection, Q4_K elsewhere."""
    if name == "output.weight" or name.endswith(("attn_v.weight", "ffn_down.weight", "attn_qkv.weight")):
        return T.Q6_K
    return T.Q4_K


def llama3_rope_factors(base: float, factor: float = 8.0) -> np.ndarray:
    """What llama.cpp's converter stores for Llama 3.1's rope_scaling (factor 8, 1, 4, 8192)."""
    wavelengths = 2 * np.pi * base ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    smooth = (8192 / wavelengths - 1) / (4 - 1)
    return np.where(wavelengths < 8192 / 4, 1.0, np.where(wavelengths > 8192, factor, 1 / ((1 - smooth) / factor
                                                                                         + smooth))).astype(np.float32)


def write(path: Path, arch: str, vocabulary: dict, kind_of, seed: int, llama3: bool = False) -> None:
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, arch=arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_block_count(layers(arch))
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_dimension_count(HEAD_DIM)
    base = 500000.0 if llama3 else 10000.0
    writer.add_rope_freq_base(base)
    writer.add_layer_norm_rms_eps(1e-6)
    if arch.startswith("gemma"):
        writer.add_sliding_window(CONTEXT)
        writer.add_add_space_prefix(False)  # as llama.cpp's converter writes every Gemma file
    if arch == "qwen3moe":
        writer.add_expert_count(EXPERTS)
        writer.add_expert_used_count(2)
        writer.add_expert_feed_forward_length(FFN)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(50.0)
        writer.add_final_logit_softcapping(30.0)
    writer.add_tokenizer_model(vocabulary["model"])
    writer.add_tokenizer_pre(vocabulary["pre"])
    writer.add_token_list(vocabulary["tokens"])
    writer.add_token_types([int(t) for t in vocabulary["types"]])
    if vocabulary["scores"] is not None:
        writer.add_token_scores(vocabulary["scores"])
    if vocabulary["merges"] is not None:
        writer.add_token_merges(vocabulary["merges"])
    writer.add_bos_token_id(vocabulary["bos"])
    writer.add_eos_token_id(vocabulary["eos"])
    writer.add_add_bos_token(vocabulary["add_bos"])
    tensors = _weights(arch, vocabulary["readable"], rng)
    if llama3:
        tensors["rope_freqs.weight"] = llama3_rope_factors(base)
    for name, values in tensors.items():
        kind = kind_of(name) if values.ndim >= 2 and "ffn_gate_inp" not in name else T.F32
        data = values if kind == T.F32 else quantize(values.reshape(-1, values.shape[-1]), kind).reshape(
            *values.shape[:-1], -1)
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


FIXTURES = {  # file name: (architecture, vocabulary, type of each 2-D weight)
    **{f"llama-{k.lower()}": ("llama", bpe_vocabulary, lambda name, k=k: T[k])
       for k in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_XS")},
    "llama-q4_k_m-spm": ("llama", spm_vocabulary, q4_k_m),
    "llama3-q4_k_m": ("llama", lambda: bpe_vocabulary(pre="llama-bpe"), q4_k_m),
    "qwen2-q4_k_m": ("qwen2", bpe_vocabulary, q4_k_m),
    "qwen3-q4_k_m": ("qwen3", bpe_vocabulary, q4_k_m),
    "qwen3moe-q4_k_m": ("qwen3moe", bpe_vocabulary, q4_k_m),
    "phi3-q4_k_m": ("phi3", lambda: spm_vocabulary(phi3=True), q4_k_m),
    "gemma2-q4_k_m": ("gemma2", lambda: spm_vocabulary(gemma=True), q4_k_m),
    "gemma3-q4_k_m": ("gemma3", lambda: spm_vocabulary(gemma=True), q4_k_m),
}
PROMPTS = [[5, 60, 61, 70, 80], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111], [42]]
# Text prompts, tokenized by llama.cpp: the importer's tokenizer must cut them the same way.
TEXTS = ["the cat sat on the mat", "Hello,  world!\n  Two spaces, then\ttabs.", "digits 12345 and ünïcödé"]


def greedy(path: Path, bos: int, add_bos: bool) -> list[dict]:
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = CONTEXT
    server = xllamacpp.Server(params)
    cases = []
    for prompt in PROMPTS:
        ids = ([bos] if add_bos else []) + prompt
        reply = server.handle_completions({"prompt": ids, "n_predict": MAX_TOKENS, "temperature": 0,
                                           "cache_prompt": False, "n_probs": 1, "return_tokens": True,
                                           "ignore_eos": True})
        assert reply["usage"]["prompt_tokens"] == len(ids)  # ids go in as they are, BOS included
        cases.append({"prompt": ids, **_greedy_steps(reply, path)})
    for text in TEXTS:
        reply = server.handle_completions({"prompt": text, "n_predict": MAX_TOKENS, "temperature": 0,
                                           "cache_prompt": False, "n_probs": 1, "ignore_eos": True})
        cases.append({"text": text, "prompt_tokens": reply["usage"]["prompt_tokens"], **_greedy_steps(reply, path)})
    return cases


def _greedy_steps(reply: dict, path: Path) -> dict:
    steps = reply["choices"][0]["logprobs"]["content"]
    assert len(steps) == MAX_TOKENS, f"{path.name}: a log-probability per token"
    return {"tokens": [s["id"] for s in steps], "logprobs": [round(s["logprob"], 5) for s in steps]}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    reference = {"llama_cpp": f"xllamacpp {version('xllamacpp')}", "max_tokens": MAX_TOKENS, "files": {}}
    for seed, (name, (arch, vocabulary, kind_of)) in enumerate(FIXTURES.items()):
        path = OUT / f"{name}.gguf"
        vocab = vocabulary()
        write(path, arch, vocab, kind_of, seed, llama3=name.startswith("llama3"))
        reference["files"][path.name] = greedy(path, vocab["bos"], vocab["add_bos"])
        print(f"{path.name}: {path.stat().st_size // 1024} KiB", file=sys.stderr)
    (OUT / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")


FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def requantize(source: Path, dest: Path, type_name: str) -> None:
    def convert(name: str, values: np.ndarray):
        if values.ndim != 2:
            return values, None
        kind = q4_k_m(name) if type_name == "Q4_K_M" else T[type_name]
        if values.shape[1] % 256 and kind in FALLBACK:
            kind = FALLBACK[kind]
        return quantize(values, kind), kind

    rewrite_gguf(source, dest, convert)


if __name__ == "__main__":
    if sys.argv[1:2] == ["requantize"]:
        requantize(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
    else:
        main()
