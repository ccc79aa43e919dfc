"""Markdown table rows, as the report and the model card write them."""

from __future__ import annotations

from collections.abc import Iterable


def row(cells: Iterable[str]) -> str:
    """One table row: ``| a | b |``."""
    return "| " + " | ".join(cells) + " |"


def head(cells: list[str]) -> list[str]:
    """A table's header row and the separator under it."""
    return [row(cells), "|" + "---|" * len(cells)]
