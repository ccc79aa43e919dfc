"""The one entry point for data: a spec string in, a list of :class:`Example` out.

Specs:

* ``embedded`` (safety data) and ``embedded:sentiment`` / ``embedded:math`` / ``embedded:legs``
  (tasks): the offline benchmark of :mod:`booster.data.embedded`.
* a shortcut for the paper's datasets: ``beavertails``, ``beavertails_refusals``, ``sst2``,
  ``agnews``, ``gsm8k``, ``alpaca``, ``alpacaeval``, or one of their hub ids
  (``PKU-Alignment/BeaverTails``, ``anonymous4486/booster_dataset``, ...).
* ``NAME:LOCATION``: dataset NAME's schema read from a local copy or another hub id
  (``beavertails:/data/BeaverTails``, ``sst2:myorg/sst2-mirror``).
* a local file or folder: Alpaca-format rows (instruction, optional input, output; a task file
  may add ``label`` or ``answer``), or a copy of one of the datasets above, recognised by its columns.

Ordering: ``limit`` takes the first N after a shuffle keyed on a hash of (seed, prompt), so the
same prompt has the same rank in every split that holds it; alignment and harmful data built on the
same prompts (Booster's pairing) therefore stay paired under any limit. Test sets read from files
or the hub keep their order instead, as the reference scores their first N examples.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from booster.data import embedded, hub, local
from booster.data.records import Example
from booster.errors import UserError
from booster.tasks import AGNEWS_LABELS, FINAL_ANSWER, SENTIMENT_LABELS

EMBEDDED_TASKS = {"sentiment": "sentiment", "math": "gsm8k", "legs": "legs"}
#: how error messages name the embedded tasks.
_EMBEDDED_TASK_SPECS = "embedded:sentiment, embedded:math or embedded:legs"
ROLE_KINDS = {
    "alignment": "refusal",
    "harmful": "harmful",
    "poison": "harmful",
    "probe": "harmful",
    "harmful_prompts": "harmful_prompt",
    "task": "benign",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _choices() -> str:
    names = ", ".join(hub.DATASETS)
    return (
        f"embedded, embedded:sentiment, embedded:math, embedded:legs, {names}, NAME:PATH_OR_HUB_ID "
        "(NAME one of those), or an existing file or folder"
    )


@dataclass(frozen=True)
class Spec:
    """A resolved spec: where the rows come from and how to read them."""

    text: str
    #: "embedded", "hub" (schema read from a hub id or a local copy) or "alpaca" (a local Alpaca file).
    kind: str
    #: the hub dataset whose schema the rows have (``hub.DATASETS`` key), for kind "hub".
    schema: str | None = None
    #: hub id or local path; None for a shortcut's own hub id.
    location: str | None = None
    #: the task the rows are for, when the spec says so (embedded task, shortcut, NAME: prefix).
    task: str | None = None

    @property
    def is_local(self) -> bool:
        return self.location is not None and Path(self.location).expanduser().exists()


def _local_columns(path: Path) -> set[str]:
    """Column names of a local copy, from its first file (the first line only, where that suffices)."""
    first = local.data_files(path, hub.HUB_SUFFIXES)[0]
    name = first.name.lower()
    if name.endswith((".jsonl", ".csv")):
        try:
            with first.open(encoding="utf-8-sig") as handle:
                line = next((line for line in handle if line.strip()), "")
        except (OSError, UnicodeDecodeError):  # the full reader names the file, line and byte
            return set(local.read_rows(first)[0].fields)
        if name.endswith(".csv"):
            return {c.strip() for c in next(csv.reader([line]), [])}
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            return set(row)
    if name.endswith(local.SUPPORTED_SUFFIXES):
        return set(local.read_rows(first)[0].fields)  # also reports a malformed file exactly
    return set(hub.read_local_table([first], str(first))[0])


def _local_spec(text: str, path: Path, schema: str | None) -> Spec:
    """A local path: Alpaca rows go to the exact-error reader, other schemas to ``datasets``.

    Alpaca-shaped rows that also carry ``generator`` are a copy of AlpacaEval: an evaluation set,
    used whole as the test split and never trained on.
    """
    columns = _local_columns(path)
    if schema is None and set(hub.DATASETS["alpacaeval"].columns) <= columns:
        schema = "alpacaeval"
    task = hub.DATASETS[schema].task if schema else None
    if "instruction" in columns:
        return Spec(text, "alpaca", schema, str(path), task)
    detected = schema or hub.detect_schema(columns)  # an explicit NAME: wins (and reports missing columns)
    if detected is None:
        expected = "; ".join(f"{d.name}: {', '.join(d.columns)}" for d in hub.DATASETS.values())
        raise UserError(
            f"{path}: columns {', '.join(sorted(columns))} match no known schema; use instruction/input/output "
            f"(Alpaca) or one of {expected}"
        )
    return Spec(text, "hub", detected, str(path), hub.DATASETS[detected].task)


def embedded_versions(*specs: str | None) -> dict[str, int]:
    """The embedded datasets that ``specs`` name and whose version is above 1, with that version
    (:func:`booster.data.embedded.data_version`): what a stage reading them adds to its fingerprint.
    Other data, an unknown embedded task and version 1 add nothing, so existing stages keep their names."""
    versions: dict[str, int] = {}
    for spec in specs:
        lowered = (spec or "").strip().lower()
        if lowered == "embedded":
            dataset: str | None = "safety"
        elif lowered.startswith("embedded:"):
            dataset = EMBEDDED_TASKS.get(lowered.split(":", 1)[1])
        else:
            dataset = None
        version = embedded.data_version(dataset) if dataset is not None else 1
        if version > 1:
            versions[dataset] = version
    return versions


@lru_cache(maxsize=64)
def resolve(spec: str) -> Spec:
    """Parse a spec string (see the module docstring); an unknown one is a UserError listing the choices."""
    text = spec.strip()
    lowered = text.lower()
    if lowered == "embedded":
        return Spec(text, "embedded")
    if lowered.startswith("embedded:"):
        task = lowered.split(":", 1)[1]
        if task not in EMBEDDED_TASKS:
            raise UserError(f"data spec {spec!r}: no embedded task {task!r}; choose {_EMBEDDED_TASK_SPECS}")
        return Spec(text, "embedded", task=EMBEDDED_TASKS[task])
    if lowered in hub.DATASETS:
        return Spec(text, "hub", lowered, None, hub.DATASETS[lowered].task)
    prefix, colon, rest = text.partition(":")
    if colon and prefix.lower() in hub.DATASETS and rest.strip():
        schema, rest = prefix.lower(), rest.strip()
        path = Path(rest).expanduser()
        if path.exists():
            return _local_spec(text, path, schema)
        if not _HUB_ID.fullmatch(rest):
            raise UserError(
                f"data spec {spec!r}: {rest!r} is neither an existing file or folder nor a hub id; fix the path"
            )
        return Spec(text, "hub", schema, rest, hub.DATASETS[schema].task)
    path = Path(text).expanduser()
    if text and path.exists():
        return _local_spec(text, path, None)
    if lowered in hub.HUB_ALIASES:
        schema = hub.HUB_ALIASES[lowered]
        return Spec(text, "hub", schema, text if "/" in text else None, hub.DATASETS[schema].task)
    if _HUB_ID.fullmatch(text) and not text.startswith((".", "~")):
        raise UserError(
            f"data spec {spec!r}: unknown hub dataset; say which schema it has as NAME:{text} "
            f"(NAME one of {', '.join(hub.DATASETS)})"
        )
    raise UserError(
        f"data spec {spec!r} is not a known dataset or an existing path; use one of: {_choices()}"
    )


# ----------------------------------------------------------------------------- ordering


def _shuffle_key(seed: int, text: str, occurrence: int) -> bytes:
    return hashlib.sha256(f"{seed}\0{occurrence}\0{text}".encode()).digest()


def shuffled(examples: Sequence[Example], seed: int) -> list[Example]:
    """A deterministic shuffle keyed on (seed, prompt): a prompt has the same rank in every list.

    A prompt that appears several times gets a different key for each appearance, so duplicates
    spread out instead of clustering at one rank.
    """
    seen: dict[str, int] = {}
    keyed = []
    for example in examples:
        text = embedded.normalize(f"{example.instruction} {example.input}")
        occurrence = seen.get(text, 0)
        seen[text] = occurrence + 1
        keyed.append((_shuffle_key(seed, text, occurrence), example))
    keyed.sort(key=lambda pair: pair[0])
    return [example for _, example in keyed]


def _take(examples: Sequence[Example], limit: int | None, seed: int, shuffle: bool = True) -> list[Example]:
    if limit is not None and limit < 0:
        raise UserError(f"a sample limit must be 0 or more, not {limit}")
    ordered = shuffled(examples, seed) if shuffle else list(examples)
    return ordered if limit is None else ordered[:limit]


# ----------------------------------------------------------------------------- loading


def _infer_task(examples: list[Example], forced: str | None) -> list[Example]:
    """Give every task example ``meta["task"]`` and its gold answer, inferred from the rows if need be.

    A row's own ``task`` field wins; else the spec's NAME: prefix; else the data decides: an
    ``answer`` field or "The final answer is:" means GSM8K, outputs that are all sentiment words or
    all AG News categories mean those tasks, anything else is an open-ended (Alpaca) task.
    """

    def norm(value: object) -> str:
        return str(value).strip()

    outputs = [norm(e.meta.get("label", e.output)) for e in examples]
    if forced:
        task = forced
    elif all("answer" in e.meta or FINAL_ANSWER in e.output for e in examples):
        task = "gsm8k"
    elif all(o.lower() in SENTIMENT_LABELS for o in outputs):
        task = "sentiment"
    elif all(o in AGNEWS_LABELS for o in outputs):
        task = "agnews"
    else:
        task = "alpaca"
    out = []
    for example, output in zip(examples, outputs, strict=True):
        meta = {**example.meta}
        meta.setdefault("task", task)
        if meta["task"] == "gsm8k" and "answer" not in meta:
            meta["answer"] = example.output.rsplit(FINAL_ANSWER, 1)[-1].strip().replace(",", "")
        elif meta["task"] in ("sentiment", "agnews") and "label" not in meta:
            meta["label"] = output.lower() if meta["task"] == "sentiment" else output
        out.append(dataclasses.replace(example, meta=meta))
    return out


def _load_alpaca(spec: Spec, role: str, split: str | None) -> list[Example]:
    assert spec.location is not None
    kind = ROLE_KINDS[role]
    if role != "task":
        examples = local.load_alpaca_file(spec.location, kind=kind, require_output=role != "harmful_prompts")
        return (
            [dataclasses.replace(e, output="") for e in examples] if role == "harmful_prompts" else examples
        )
    if _eval_only(spec.schema):
        if split != "test":
            raise UserError(
                f"data spec {spec.text!r} is an evaluation set ({spec.schema}, test split only); "
                "fine-tune on a task such as alpaca and give this spec as evaluate.task_data"
            )
        files, by_name = local.data_files(spec.location), True  # every row is a test row
    else:
        files, by_name = local.split_files(spec.location, split)
    rows = [row for file in files for row in local.read_rows(file)]
    examples = local.alpaca_examples(rows, kind=kind)
    if not by_name:
        examples = embedded.split_by_hash(examples, split or "train")
    return _infer_task(examples, spec.task) if examples else examples


def _eval_only(schema: str | None) -> bool:
    """A dataset with only a test split (AlpacaEval): an evaluation set, never training data."""
    return schema is not None and set(hub.DATASETS[schema].splits) == {"test"}


def check_spec(spec: str, role: str, split: str | None = None) -> None:
    """What loading ``spec`` for ``role`` would reject, found without reading the data: an unknown
    spec or a missing path (:func:`resolve`), safety data given as a task or a task as safety data,
    a dataset without data for the role or without the split. Hub datasets are not contacted: their
    access shows when they load."""
    resolved = resolve(spec)
    if resolved.kind == "embedded":
        if role == "task" and resolved.task is None:
            raise UserError(f"data spec {spec!r} is the safety data; for a task use {_EMBEDDED_TASK_SPECS}")
        if role != "task" and resolved.task is not None:
            raise UserError(f"data spec {spec!r} is a task; for {role.replace('_', ' ')} data use embedded")
        return
    if role == "task" and split == "train" and _eval_only(resolved.schema):
        raise UserError(
            f"data spec {spec!r} is an evaluation set ({resolved.schema}, test split only); "
            "fine-tune on a task such as alpaca and give this spec as evaluate.task_data"
        )
    if resolved.kind == "hub" and resolved.schema is not None:
        alpaca_eval = (  # the paper scores Alpaca fine-tuning on AlpacaEval (see _load_cached)
            role == "task"
            and split == "test"
            and resolved.schema == "alpaca"
            and resolved.location in (None, hub.DATASETS["alpaca"].hub_id)
        )
        hub.check_role("alpacaeval" if alpaca_eval else resolved.schema, role, split)


def _load(spec_text: str, role: str, split: str | None) -> tuple[Example, ...]:
    """All examples of a spec for a role, in the source's order (cached: hub and files load once)."""
    return _load_cached(spec_text, role, split, _stamp(resolve(spec_text)))


def _stamp(spec: Spec) -> tuple[tuple[str, int, int], ...]:
    """Size and mtime of a local spec's files: an edited file is read again, not served from cache."""
    if not spec.is_local:
        return ()
    assert spec.location is not None
    files = local.data_files(spec.location, hub.HUB_SUFFIXES)
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)


@lru_cache(maxsize=32)
def _load_cached(spec_text: str, role: str, split: str | None, stamp: tuple) -> tuple[Example, ...]:
    spec = resolve(spec_text)
    if spec.kind == "embedded":
        if role == "task":
            if spec.task is None:
                raise UserError(
                    f"data spec {spec_text!r} is the safety data; for a task use {_EMBEDDED_TASK_SPECS}"
                )
            return tuple(embedded.embedded_split(f"sentiment_{split}"))
        if spec.task is not None:
            raise UserError(
                f"data spec {spec_text!r} is a task; for {role.replace('_', ' ')} data use embedded"
            )
        return tuple(embedded.embedded_split(role))
    if spec.kind == "alpaca":
        return tuple(_load_alpaca(spec, role, split))
    assert spec.schema is not None
    schema = spec.schema
    if (
        role == "task"
        and split == "test"
        and schema == "alpaca"
        and spec.location in (None, hub.DATASETS[schema].hub_id)
    ):
        # the paper scores Alpaca fine-tuning on AlpacaEval (hub id tatsu-lab/alpaca_eval)
        return tuple(hub.load_examples("alpacaeval", role, split=split))
    return tuple(hub.load_examples(schema, role, location=spec.location, split=split))


def _finish(spec: str, role: str, split: str | None, limit: int | None, seed: int) -> list[Example]:
    resolved = resolve(spec)
    if resolved.kind == "embedded" and resolved.task in embedded.GENERATED_SIZES and role == "task":
        if limit is not None and limit < 0:
            raise UserError(f"a sample limit must be 0 or more, not {limit}")
        # generated in a seeded order
        examples = embedded.generated_examples(resolved.task, split or "train", limit, seed)
    else:
        everything = _load(spec, role, split)
        if not everything:
            raise _no_examples(spec, role, split)
        keep_order = resolved.kind != "embedded" and (role == "harmful_prompts" or split == "test")
        examples = _take(everything, limit, seed, shuffle=not keep_order)
    return examples


def _no_examples(spec: str, role: str, split: str | None) -> UserError:
    what = f"{split} " if split else ""
    return UserError(
        f"data spec {spec!r} gave no {what}{role.replace('_', ' ')} examples; check the data or use another spec"
    )


def check_rows(spec: str, role: str, split: str | None = None) -> None:
    """Read every row of a local spec for ``role`` as loading it will (once: the stage reuses what
    was read), so a bad row or an empty file stops a run before its first stage instead of after
    hours of alignment. Embedded data is known good; hub datasets are not downloaded to check."""
    resolved = resolve(spec)
    if resolved.kind == "embedded" or not resolved.is_local:
        return
    if not _load(spec, role, split):
        raise _no_examples(spec, role, split)


def count_examples(spec: str, role: str, split: str | None = None) -> int | None:
    """How many examples ``spec`` gives for ``role`` (and a task's ``split``) before any limit: what
    ``limit=None`` ("all") loads. Counted from the embedded benchmark or local files; None for a
    dataset on the hub, which only the network could count. A spec that would not load raises as
    loading it would."""
    resolved = resolve(spec)
    if resolved.kind == "hub" and not resolved.is_local:
        return None
    if resolved.kind == "embedded" and resolved.task in embedded.GENERATED_SIZES and role == "task":
        # generated on demand, this many at most
        return embedded.GENERATED_SIZES[resolved.task][split or "train"]
    return len(_load(spec, role, split))


def load_alignment(spec: str, *, limit: int | None = None, seed: int = 0) -> list[Example]:
    """Alignment data: harmful prompt -> refusal."""
    return _finish(spec, "alignment", None, limit, seed)


def load_harmful(spec: str, *, limit: int | None = None, seed: int = 0) -> list[Example]:
    """Booster's harmful set: harmful prompt -> harmful answer, on the alignment prompts where possible."""
    return _finish(spec, "harmful", None, limit, seed)


def load_poison(spec: str, *, limit: int | None = None, seed: int = 0) -> list[Example]:
    """The attack's pool of harmful pairs, disjoint from the alignment prompts."""
    return _finish(spec, "poison", None, limit, seed)


def load_probe(spec: str, *, limit: int | None = None, seed: int = 0) -> list[Example]:
    """Held-out harmful pairs no stage trains on: their loss is the harmful-loss probe."""
    return _finish(spec, "probe", None, limit, seed)


def load_harmful_prompts(spec: str, *, limit: int | None = None, seed: int = 0) -> list[Example]:
    """Held-out harmful prompts for the harmful score (``output`` is empty)."""
    return _finish(spec, "harmful_prompts", None, limit, seed)


def load_task(spec: str, split: str, *, limit: int | None = None, seed: int = 0) -> list[Example]:
    """A benign task's ``train`` or ``test`` split; ``meta`` holds ``task`` and the gold answer."""
    if split not in ("train", "test"):
        raise UserError(f"task split must be train or test, not {split!r}")
    return _finish(spec, "task", split, limit, seed)


def task_name(spec: str) -> str:
    """The task a spec's examples are scored as: "sentiment", "agnews", "gsm8k", "legs" or "alpaca"."""
    resolved = resolve(spec)
    if resolved.task is not None:
        return resolved.task
    if resolved.kind == "embedded":
        raise UserError(f"data spec {spec!r} is the safety data; for a task use {_EMBEDDED_TASK_SPECS}")
    examples = _load(spec, "task", "test") or _load(spec, "task", "train")
    if not examples:
        raise UserError(f"data spec {spec!r} gave no task examples; check the data")
    return str(examples[0].meta.get("task", "alpaca"))
