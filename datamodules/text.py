"""Item text as one clean line: the single cleaning used by the raw-Amazon converter, the prompts and the
LLM embeddings, so an item's text is the same string wherever it is read."""

from __future__ import annotations

import ast
import html
import re
from typing import Any

_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def clean_text(value: Any) -> str:
    """HTML unescaped, tags dropped, whitespace collapsed; lists are cleaned piecewise and joined with a space.

    A string holding a Python list literal (Amazon 2018 and LC-Rec store some descriptions as
    ``"['first', 'second']"``) is unpacked as a list. ``None`` gives ``""``.
    """
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(piece for piece in map(clean_text, value) if piece)
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parts = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            parts = None
        if isinstance(parts, (list, tuple)):
            return clean_text(list(parts))
    # a tag becomes a space so that "line<br>line" does not glue words together
    return _SPACE.sub(" ", _TAG.sub(" ", html.unescape(text))).strip()
