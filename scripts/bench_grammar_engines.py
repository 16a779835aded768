"""Compare grammar engines for constrained decoding on a model's vocabulary: compile time, mask time, coverage.

The figures in ARCHITECTURE.md (why mlxserve uses llguidance) come from this script:

    python scripts/bench_grammar_engines.py --model-dir ~/.mlxserve/models/smollm2-135m-instruct
    # outlines-core is not a dependency; to include it, run with it on the path, e.g.
    # pip install --target /tmp/oc outlines-core && PYTHONPATH=/tmp/oc python scripts/bench_grammar_engines.py ...

For each engine that imports: the time to build its view of the tokenizer, to compile a 10-property
JSON Schema, and to compute the token mask at each step of a valid 65-token document (median, p95),
then which of 18 JSON Schema keywords it compiles. xgrammar is not measured: it imports torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

SCHEMA = {"type": "object", "additionalProperties": False, "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"}, "city": {"type": "string"},
    "country": {"type": "string"}, "score": {"type": "number"}, "active": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string"}}, "zip": {"type": "string"}, "phone": {"type": "string"}},
    "required": ["name", "age", "email", "city", "country", "score", "active", "tags", "zip", "phone"]}
DOCUMENT = json.dumps({"name": "Alice Smith", "age": 34, "email": "alice@example.com", "city": "Paris",
                       "country": "France", "score": 9.5, "active": True, "tags": ["a", "bb"], "zip": "75001",
                       "phone": "+33 1 23"}, separators=(",", ":"))
KEYWORDS = {
    "enum": {"enum": ["a", "b"]}, "const": {"const": 3},
    "anyOf": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "oneOf": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}}, {"required": ["a"]}]},
    "$ref (recursive)": {"$defs": {"n": {"type": "object", "properties": {
        "c": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}}, "$ref": "#/$defs/n"},
    "pattern": {"type": "string", "pattern": "^[a-z]+$"},
    "format": {"type": "string", "format": "date-time"},
    "minLength/maxLength": {"type": "string", "minLength": 2, "maxLength": 5},
    "minimum/maximum": {"type": "integer", "minimum": 1, "maximum": 99},
    "minItems/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]},
    "additionalProperties (schema)": {"type": "object", "additionalProperties": {"type": "integer"}},
    "patternProperties": {"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
    "uniqueItems": {"type": "array", "uniqueItems": True},
    "if/then": {"if": {"type": "string"}, "then": {"minLength": 1}},
    "not": {"not": {"type": "string"}},
    "multipleOf": {"type": "integer", "multipleOf": 3},
}


def _report(name: str, tokenizer_s: float, compile_s: float, masks: list[float], covered: list[str]) -> None:
    print(f"{name}: tokenizer {tokenizer_s * 1e3:.0f} ms, compile {compile_s * 1e3:.1f} ms, mask median "
          f"{statistics.median(masks) * 1e6:.0f} us, p95 {np.percentile(masks, 95) * 1e6:.0f} us; "
          f"{len(covered)}/{len(KEYWORDS)} keywords; missing: {sorted(set(KEYWORDS) - set(covered))}")


def llguidance_figures(hf, ids: list[int]) -> None:
    import llguidance
    import llguidance.hf
    import llguidance.numpy as lnp

    start = time.perf_counter()
    tokenizer = llguidance.hf.from_tokenizer(hf)
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False}))
    compile_s = time.perf_counter() - start
    mask = lnp.allocate_token_bitmask(1, tokenizer.vocab_size)
    masks = []
    for token in ids:
        start = time.perf_counter()
        lnp.fill_next_token_bitmask(matcher, mask, 0)
        masks.append(time.perf_counter() - start)
        assert matcher.consume_token(token), matcher.get_error()
    covered = [k for k, s in KEYWORDS.items()
               if not llguidance.LLMatcher.validate_grammar_with_warnings(
                   llguidance.LLMatcher.grammar_from_json_schema(s))[0]]
    _report("llguidance", tokenizer_s, compile_s, masks, covered)


def outlines_core_figures(hf, ids: list[int]) -> None:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    start = time.perf_counter()
    eos = hf.eos_token_id
    by_token: dict[str, list[int]] = {}
    for text, i in hf.get_vocab().items():
        if i != eos:
            by_token.setdefault(text, []).append(i)
    vocabulary = Vocabulary(eos, by_token)
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
    compile_s = time.perf_counter() - start
    guide = Guide(index)
    mask = np.zeros((len(hf) + 31) // 32, dtype=np.int32)
    masks = []
    for token in ids:
        start = time.perf_counter()
        guide.write_mask_into(mask.ctypes.data, mask.size, 4)
        masks.append(time.perf_counter() - start)
        guide.advance(token)
    covered = []
    for keyword, schema in KEYWORDS.items():
        try:
            build_regex_from_schema(json.dumps(schema))
            covered.append(keyword)
        except Exception:  # noqa: BLE001 - any failure means "not covered"
            pass
    _report("outlines-core", tokenizer_s, compile_s, masks, covered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a model directory with tokenizer files")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(args.model_dir)
    ids = hf.encode(DOCUMENT, add_special_tokens=False)
    print(f"vocabulary {len(hf)}, document {len(ids)} tokens")
    for figures in (llguidance_figures, outlines_core_figures):
        try:
            figures(hf, ids)
        except ImportError as exc:
            print(f"{figures.__name__.removesuffix('_figures')}: not installed ({exc.name})")


if __name__ == "__main__":
    main()
