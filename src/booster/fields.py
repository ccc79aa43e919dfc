"""Dataclass field markers shared by every config section.

Kept apart from :mod:`booster.config` so that :mod:`booster.models` (which ``config`` imports) can
declare its fields with them without an import cycle.
"""

from __future__ import annotations

import dataclasses
from typing import Any

#: field metadata of a setting added after stage folders were first written: it enters a stage's
#: fingerprint only when set away from its default, so finished stages keep their names (and are
#: reused) when a new setting appears. Use :func:`added_later` to declare one.
ADDED_LATER = "fingerprint_only_when_set"


def added_later(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field that is fingerprinted only when it differs from its default."""
    return dataclasses.field(default=default, metadata={ADDED_LATER: True}, **kwargs)
