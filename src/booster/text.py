"""Words of a model's answer, as the task parsers and the degenerate-answer test both read them."""

from __future__ import annotations

import re

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def words(text: str) -> list[str]:
    """Lower-case words without punctuation (apostrophes inside a word are kept: "can't")."""
    return [w.lower() for w in _WORD.findall(text)]
