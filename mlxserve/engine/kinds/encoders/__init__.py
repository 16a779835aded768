"""Encoder architectures for embedding models, by `model_type` in config.json.

Adding a family means adding one module here with a `Model(config)` class whose
`__call__(input_ids, attention_mask)` returns the last hidden states, and one
entry in ENCODERS.
"""

from __future__ import annotations

from mlxserve.engine.kinds.encoders import bert

ENCODERS = {
    "bert": bert.Model,
}
