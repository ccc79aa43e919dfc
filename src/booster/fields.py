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
#: field metadata of a setting that never changes what a stage computes (where its logs go, how
#: its run is named): it never enters a stage's fingerprint and cannot be swept.
NOT_FINGERPRINTED = "never_fingerprinted"


def added_later(default: Any = dataclasses.MISSING, *, fingerprinted: bool = True, **kwargs: Any) -> Any:
    """A dataclass field that is fingerprinted only when it differs from its default (never, with
    ``fingerprinted=False``: for settings that do not change the trained model)."""
    metadata = {ADDED_LATER: True}
    if not fingerprinted:
        metadata[NOT_FINGERPRINTED] = True
    return dataclasses.field(default=default, metadata=metadata, **kwargs)
