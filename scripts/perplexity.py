"""Perplexity of `mlxserve import`ed GGUF files against llama.cpp's on the same files, and what each
conversion took (time, peak memory of the converting process).

    python scripts/perplexity.py --llamacpp-python /tmp/llvenv/bin/python A.gguf [B.gguf ...]

The text is scripts/data/perplexity.txt (public domain and plain facts), tokenized once by the imported
model's tokenizer (BOS first where the model adds one); both sides score the same token ids,
teacher-forced: mlxserve in one forward pass through the model as the server loads it, llama.cpp's
own server one request per position with the true token forced by `logit_bias` (the log-probability
it reports is from the model's distribution before sampling, so the bias does not touch it).
Perplexity is exp of the mean negative log-likelihood of every token after the first. llama.cpp
also scores the same weights dequantized to F32: on quantized weights it rounds the activations to
8 bits before each product, and the F32 run shows what that alone costs. (The text must tokenize
into whole characters: llama.cpp reports nothing for a token that ends inside one.)

To make real-model files in other types with llama.cpp's own quantizer, see
`scripts/make_gguf_fixtures.py requantize`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from mlxserve import blas  # noqa: E402

blas.preload_openblas()  # before MLX: the model is scored as the server computes it
import mlx.core as mx  # noqa: E402
from bench import Server  # noqa: E402
from tests.fixtures.gguf_rewrite import to_float32  # noqa: E402

TEXT = ROOT / "scripts" / "data" / "perplexity.txt"


def convert(gguf: Path, out: Path, bits: int | None, group_size: int | None) -> tuple[float, int]:
    """Convert in a child process: (seconds, the child's peak resident bytes).

    The child reports its own peak (Linux's VmHWM): the peak a parent reads with wait4() also counts
    the parent's pages the child held between fork and exec, this script's models included."""
    code = ("import sys, json; from pathlib import Path; from mlxserve.engine.gguf import convert_gguf; "
            "convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]), **json.loads(sys.argv[3])); "
            "status = Path('/proc/self/status'); "
            "print(status.read_text().split('VmHWM:')[1].split()[0] if status.exists() else '')")
    options = json.dumps({"bits": bits, "group_size": group_size})
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, str(gguf), str(out), options], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    reported = child.stdout.read().split() if child.stdout else []
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"converting {gguf} failed")
    peak = int(reported[-1]) * 1024 if reported and reported[-1].isdigit() else usage.ru_maxrss * 1024
    return time.perf_counter() - start, peak


def ours(model_dir: Path) -> tuple[list[int], list[float]]:
    """The text's token ids and each one's log-probability after the ones before it, in our model."""
    from mlxserve.engine.store import ModelStore

    loaded = ModelStore(model_dir.parent).load(model_dir.name)
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode(TEXT.read_text())[: loaded.context_length]  # a tiny vocabulary's text may not fit
    logits = loaded.model(mx.array([ids]))[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return ids, [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]


def llama_cpp(python: str, gguf: Path, ids: list[int], log_dir: Path) -> list[float]:
    server = Server("llama.cpp", [python, str(ROOT / "scripts" / "llamacpp_server.py"), str(gguf), "{port}"], "m")
    server.start(log_dir)
    try:
        out = []
        for i in range(1, len(ids)):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            body = {"prompt": ids[:i], "n_predict": 1, "temperature": 0, "n_probs": 1, "cache_prompt": True,
                    "logit_bias": [[ids[i], 1e6]], "id_slot": 0}
            conn.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
            reply = json.loads(conn.getresponse().read())
            if not reply.get("completion_probabilities"):
                raise RuntimeError(f"llama.cpp gave no probability at position {i} (a token inside a character?)")
            step = reply["completion_probabilities"][0]
            if step["id"] != ids[i]:
                raise RuntimeError(f"llama.cpp did not take the forced token at position {i}")
            out.append(step["logprob"])
        return out
    finally:
        server.stop()


def nll(logprobs: list[float]) -> float:
    """Mean negative log-likelihood, nats per token: perplexity is its exp (too large to be a float for a
    random-weight fixture, whose ratios still say how close two runs are)."""
    return -sum(logprobs) / len(logprobs)


def perplexity(mean_nll: float) -> float | None:
    return round(math.exp(mean_nll), 4) if mean_nll < 700 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path, nargs="+")
    parser.add_argument("--llamacpp-python", required=True, help="a Python with xllamacpp")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--bits", type=int, help="import with `mlxserve import --bits`")
    parser.add_argument("--group-size", type=int, help="import with `mlxserve import --group-size`")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for gguf in args.gguf:
            model_dir = Path(scratch) / "models" / gguf.stem.lower().replace(".", "-")
            seconds, peak = convert(gguf, model_dir, args.bits, args.group_size)
            ids, mine = ours(model_dir)
            theirs = llama_cpp(args.llamacpp_python, gguf, ids, Path(scratch))
            f32 = to_float32(gguf, Path(scratch) / "f32.gguf")
            theirs_f32 = llama_cpp(args.llamacpp_python, f32, ids, Path(scratch))
            f32.unlink()
            row = {"file": gguf.name, "size_mib": round(gguf.stat().st_size / 2**20, 1), "tokens": len(ids),
                   "convert_s": round(seconds, 2), "convert_peak_rss_mib": round(peak / 2**20),
                   "ppl_mlxserve": perplexity(nll(mine)), "ppl_llama_cpp": perplexity(nll(theirs)),
                   "ppl_llama_cpp_f32": perplexity(nll(theirs_f32)),
                   "ppl_ratio": round(math.exp(nll(mine) - nll(theirs)), 4),
                   "ppl_ratio_f32": round(math.exp(nll(mine) - nll(theirs_f32)), 4),
                   "max_token_logprob_diff": round(float(np.max(np.abs(np.array(mine) - np.array(theirs)))), 3)}
            results.append(row)
            print(json.dumps(row), flush=True)
    print("\n| file | MiB | convert s | convert peak RSS MiB | PPL mlxserve | PPL llama.cpp | ratio "
          "| PPL llama.cpp, weights in F32 | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['file']} | {r['size_mib']} | {r['convert_s']} | {r['convert_peak_rss_mib']} | "
              f"{r['ppl_mlxserve']} | {r['ppl_llama_cpp']} | {r['ppl_ratio']} | {r['ppl_llama_cpp_f32']} "
              f"| {r['ppl_ratio_f32']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
