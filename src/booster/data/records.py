"""The one record type every data source produces.

Everything the project trains or evaluates on is an instruction-following example in the Alpaca
shape; sources differ only in where the rows come from. A ``kind`` tag travels with each record
so that splits and reports can say what a row is without guessing from its text.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One instruction -> response pair (Alpaca fields)."""

    instruction: str
    output: str = ""
    input: str = ""
    #: what the row is: "refusal", "harmful", "benign", "harmful_prompt", ...
    kind: str = ""
    #: where it came from (package/file or hub id), for `booster data info` and the report.
    source: str = ""
    #: free-form extras a task needs to score an answer (e.g. {"label": "positive"}).
    meta: dict = field(default_factory=dict, compare=False, hash=False)
