"""Model names: the one check every name from a client, a flag or a file goes through.

A model name is one folder under the model directory, so it must never reach outside it ('..', '/'),
hide itself ('.name'), or exceed what a file system takes.
"""

from __future__ import annotations

import re

from mlxserve.protocol import InvalidRequestError

MAX_LENGTH = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]*")


class InvalidModelNameError(InvalidRequestError):
    param = "model"
    code = "invalid_model_name"


def check_model_name(name: str) -> str:
    """`name` if it can be a model's folder name; InvalidModelNameError saying why otherwise."""
    if not isinstance(name, str) or not name:
        raise InvalidModelNameError("A model name must be a non-empty string")
    shown = name if len(name) <= 40 else name[:40] + "…"
    if len(name) > MAX_LENGTH:
        raise InvalidModelNameError(f"The model name '{shown}' is {len(name)} characters long; at most "
                                    f"{MAX_LENGTH} are allowed")
    if not _NAME.fullmatch(name) or ".." in name:
        raise InvalidModelNameError(
            f"{shown!r} is not a valid model name: use letters, digits and . _ - + @, starting with a letter "
            "or digit, without '..'")
    return name
