"""The paper's real datasets, from the hub or from a local copy in the same schema.

Every dataset is read with ``datasets.load_dataset``: a hub id, or for a local copy (a file or a
folder of ``.json``/``.jsonl``/``.csv``/``.parquet``, optionally gzipped) the ``json``/``csv``/
``parquet`` builders on its files, so a copy downloaded once loads the same way offline. Rows are
turned into :class:`Example` records the way the Booster reference code builds its prompts
(instructions, label words, "The final answer is: " for GSM8K).

Harmful data from BeaverTails and its refusal file is divided by a hash of the prompt: alignment
and Booster's harmful set use one half, the attack's poison pool the other, so the poison is never
a prompt the model was aligned on (the reference code keeps them apart by row ranges of one file).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from booster.data.embedded import POISON_FRACTION, PROBE_FRACTION, bucket, normalize, split_by_hash
from booster.data.local import split_files
from booster.data.records import Example
from booster.errors import UserError
from booster.models import cache_dir
from booster.tasks import (
    AGNEWS_INSTRUCTION,
    AGNEWS_LABELS,
    FINAL_ANSWER,
    SENTIMENT_INSTRUCTION,
    SENTIMENT_LABELS,
)

HUB_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".json.gz", ".jsonl.gz", ".csv.gz")
ROLES = ("alignment", "harmful", "poison", "probe", "harmful_prompts", "task")


@dataclass(frozen=True)
class HubDataset:
    """Where a dataset lives on the hub and what its rows look like."""

    name: str
    hub_id: str
    #: our split ("train" / "test") -> the hub's split name.
    splits: dict[str, str]
    #: columns a row must have; also how a local copy's schema is recognised.
    columns: tuple[str, ...]
    #: the roles its rows can play (see ``ROLES``).
    roles: tuple[str, ...]
    #: the task name for fine-tune accuracy, for task datasets.
    task: str | None = None
    config: str | None = None
    #: read with this builder on these files instead of by hub id (a repo without a loader).
    builder: str | None = None
    data_files: str | None = None


DATASETS: dict[str, HubDataset] = {
    d.name: d
    for d in (
        # Most specific column sets first: schema detection takes the first match.
        HubDataset(
            "beavertails_refusals",
            "anonymous4486/booster_dataset",
            {"train": "train"},
            ("prompt", "response", "refusal"),
            ("alignment", "harmful", "poison", "probe"),
        ),
        HubDataset(
            "beavertails",
            "PKU-Alignment/BeaverTails",
            {"train": "30k_train", "test": "30k_test"},
            ("prompt", "response", "is_safe"),
            ("harmful", "poison", "probe", "harmful_prompts"),
        ),
        HubDataset(
            "alpacaeval",
            "tatsu-lab/alpaca_eval",
            {"test": "train"},
            ("instruction", "output", "generator"),
            ("task",),
            task="alpaca",
            builder="json",
            data_files="hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval.json",
        ),
        HubDataset(
            "sst2",
            "stanfordnlp/sst2",
            {"train": "train", "test": "validation"},
            ("sentence", "label"),
            ("task",),
            "sentiment",
        ),
        HubDataset(
            "agnews",
            "fancyzhx/ag_news",
            {"train": "train", "test": "test"},
            ("text", "label"),
            ("task",),
            "agnews",
        ),
        HubDataset(
            "gsm8k",
            "openai/gsm8k",
            {"train": "train", "test": "test"},
            ("question", "answer"),
            ("task",),
            "gsm8k",
            "main",
        ),
        HubDataset(
            "alpaca", "tatsu-lab/alpaca", {"train": "train"}, ("instruction", "output"), ("task",), "alpaca"
        ),
    )
}
#: other names of the same hub datasets (lower case).
HUB_ALIASES = {
    "pku-alignment/beavertails": "beavertails",
    "anonymous4486/booster_dataset": "beavertails_refusals",
    "sst2": "sst2",
    "stanfordnlp/sst2": "sst2",
    "glue/sst2": "sst2",
    "ag_news": "agnews",
    "fancyzhx/ag_news": "agnews",
    "gsm8k": "gsm8k",
    "openai/gsm8k": "gsm8k",
    "tatsu-lab/alpaca": "alpaca",
    "tatsu-lab/alpaca_eval": "alpacaeval",
}


def detect_schema(columns: Iterable[str]) -> str | None:
    """The dataset whose columns a table has (the most specific match), or None."""
    present = set(columns)
    return next((d.name for d in DATASETS.values() if set(d.columns) <= present), None)


# ----------------------------------------------------------------------------- reading tables


def _builder(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".json", ".jsonl")):
        return "json"
    if name.endswith(".csv"):
        return "csv"
    return "parquet"


def read_local_table(files: Sequence[Path], where: str) -> list[dict[str, Any]]:
    """Rows of local files through ``datasets``' file builders (cached under the booster cache)."""
    import datasets  # heavy: only hub or Arrow data need it

    builders = {_builder(f) for f in files}
    if len(builders) > 1:
        raise UserError(f"{where}: mixes {', '.join(sorted(builders))} files; keep one format per dataset")
    builder = builders.pop()
    try:
        table = datasets.load_dataset(
            builder,
            data_files=[str(f) for f in files],
            split="train",
            cache_dir=str(cache_dir() / "datasets"),
        )
    except Exception as err:  # the builders raise many types for a malformed file
        raise UserError(
            f"{where}: could not read it as {builder} ({_first_line(err)}); check the file"
        ) from None
    return table.to_list()


def read_hub_table(dataset: HubDataset, hub_id: str, split: str | None) -> list[dict[str, Any]]:
    """Rows of one split of a hub dataset; no network becomes a UserError that suggests a local copy."""
    import datasets  # heavy: only hub or Arrow data need it

    hub_split = dataset.splits.get(split or "train", split or "train")
    try:
        if dataset.builder and hub_id == dataset.hub_id:
            table = datasets.load_dataset(dataset.builder, data_files=dataset.data_files, split="train")
        else:
            table = datasets.load_dataset(hub_id, dataset.config, split=hub_split)
    except Exception as err:  # offline, missing, gated, or renamed: all mean "give a local copy"
        raise UserError(
            f"dataset {hub_id!r} (split {hub_split}) could not be loaded ({_first_line(err)}); "
            f"download it where there is network and pass its local path as {dataset.name}:PATH"
        ) from None
    return table.to_list()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


# ----------------------------------------------------------------------------- rows -> examples


def _check_columns(rows: Sequence[dict[str, Any]], dataset: HubDataset, where: str) -> None:
    if not rows:
        raise UserError(f"{where}: no rows; check the file or split")
    missing = [c for c in dataset.columns if c not in rows[0]]
    if missing:
        raise UserError(
            f"{where}: missing column {missing[0]!r} for {dataset.name} (it needs {', '.join(dataset.columns)})"
        )


def _text(row: dict[str, Any], field: str, where: str, index: int) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise UserError(
            f"{where} row {index}: field {field!r} is {type(value).__name__}, not text; fix or drop the row"
        )
    return value


def _unsafe(row: dict[str, Any]) -> bool:
    """BeaverTails' ``is_safe`` as written by json, csv or parquet (bool, 0/1, "False")."""
    value = row.get("is_safe", False)
    if isinstance(value, str):
        return value.strip().lower() in ("false", "0", "no")
    return not bool(value)


def _categories(row: dict[str, Any]) -> list[str]:
    category = row.get("category")
    if isinstance(category, dict):
        return sorted(k for k, v in category.items() if v)
    return [str(category)] if category else []


def _refusal_answer(text: str, where: str, index: int) -> str:
    """The answer part of a refusal written as "Question: ...\\nAnswer: ..." (as the reference splits it)."""
    question, found, answer = text.partition("\nAnswer:")
    if not found or not answer.strip():
        raise UserError(
            f"{where} row {index}: field 'refusal' has no '\\nAnswer: ' part (expected 'Question: ...\\nAnswer: ...')"
        )
    return answer.strip()


def _harmful_halves(examples: list[Example], role: str) -> list[Example]:
    """Alignment and Booster's harmful set use one half of the prompts; poison and the probe share
    the other (the probe: ``PROBE_FRACTION`` of it, by hash)."""
    if role not in ("poison", "probe"):
        return [e for e in examples if bucket(normalize(e.instruction), "hub-poison") >= POISON_FRACTION]
    probe = role == "probe"
    return [
        e
        for e in examples
        if bucket(normalize(e.instruction), "hub-poison") < POISON_FRACTION
        and (bucket(normalize(e.instruction), "probe") < PROBE_FRACTION) == probe
    ]


def _gsm8k_answer(answer: str) -> str:
    return answer.rsplit("####", 1)[-1].strip().replace(",", "") if "####" in answer else ""


Converter = Callable[[list[dict[str, Any]], str, str], list[Example]]


def _beavertails(rows: list[dict[str, Any]], role: str, where: str) -> list[Example]:
    out = []
    for i, row in enumerate(rows, start=1):
        if not _unsafe(row):
            continue
        prompt = _text(row, "prompt", where, i)
        meta = {"category": _categories(row)}
        if role == "harmful_prompts":
            out.append(Example(prompt, "", kind="harmful_prompt", source=where, meta=meta))
        else:
            out.append(
                Example(prompt, _text(row, "response", where, i), kind="harmful", source=where, meta=meta)
            )
    return out


def _beavertails_refusals(rows: list[dict[str, Any]], role: str, where: str) -> list[Example]:
    out = []
    for i, row in enumerate(rows, start=1):
        if "is_safe" in row and not _unsafe(row):
            continue
        prompt = _text(row, "prompt", where, i)
        if role == "alignment":
            answer = _refusal_answer(_text(row, "refusal", where, i), where, i)
            out.append(Example(prompt, answer, kind="refusal", source=where))
        else:
            out.append(Example(prompt, _text(row, "response", where, i), kind="harmful", source=where))
    return out


def _sst2(rows: list[dict[str, Any]], role: str, where: str) -> list[Example]:
    positive, negative = SENTIMENT_LABELS  # SST-2's label 1 is positive, 0 negative
    out = []
    for i, row in enumerate(rows, start=1):
        label = row.get("label")
        if label in (-1, "-1", None):  # GLUE's unlabelled test rows
            continue
        try:
            word = positive if int(label) == 1 else negative
        except (TypeError, ValueError):
            raise UserError(f"{where} row {i}: field 'label' is {label!r}; SST-2 labels are 0 or 1") from None
        out.append(
            Example(
                SENTIMENT_INSTRUCTION,
                word,
                input=_text(row, "sentence", where, i).strip(),
                kind="benign",
                source=where,
                meta={"task": "sentiment", "label": word},
            )
        )
    return out


def _agnews(rows: list[dict[str, Any]], role: str, where: str) -> list[Example]:
    out = []
    for i, row in enumerate(rows, start=1):
        label = row.get("label")
        try:
            name = AGNEWS_LABELS[int(label)]
        except (TypeError, ValueError, IndexError):
            raise UserError(
                f"{where} row {i}: field 'label' is {label!r}; AG News labels are 0 to 3"
            ) from None
        out.append(
            Example(
                AGNEWS_INSTRUCTION,
                name,
                input=_text(row, "text", where, i),
                kind="benign",
                source=where,
                meta={"task": "agnews", "label": name},
            )
        )
    return out


def _gsm8k(rows: list[dict[str, Any]], role: str, where: str) -> list[Example]:
    out = []
    for i, row in enumerate(rows, start=1):
        answer = _text(row, "answer", where, i)
        final = _gsm8k_answer(answer)
        if not final:
            raise UserError(f"{where} row {i}: field 'answer' has no '#### N' final answer (GSM8K format)")
        out.append(
            Example(
                _text(row, "question", where, i),
                re.sub(r"####\s*", FINAL_ANSWER, answer),
                kind="benign",
                source=where,
                meta={"task": "gsm8k", "answer": final},
            )
        )
    return out


def _alpaca(rows: list[dict[str, Any]], role: str, where: str) -> list[Example]:
    out = []
    for i, row in enumerate(rows, start=1):
        extra = {k: row[k] for k in ("generator", "dataset") if row.get(k) is not None}
        out.append(
            Example(
                _text(row, "instruction", where, i),
                _text(row, "output", where, i),
                input=row.get("input") or "",
                kind="benign",
                source=where,
                meta={"task": "alpaca", **extra},
            )
        )
    return out


CONVERTERS: dict[str, Converter] = {
    "beavertails": _beavertails,
    "beavertails_refusals": _beavertails_refusals,
    "sst2": _sst2,
    "agnews": _agnews,
    "gsm8k": _gsm8k,
    "alpaca": _alpaca,
    "alpacaeval": _alpaca,
}


def check_role(schema: str, role: str, split: str | None = None) -> str:
    """That dataset ``schema`` has ``role`` data (and, for a task, the split); returns the split the
    role reads. Nothing is loaded, so a run checks this before it trains."""
    dataset = DATASETS[schema]
    if role not in dataset.roles:
        users = sorted(d.name for d in DATASETS.values() if role in d.roles)
        embedded = "embedded:sentiment, embedded:math, embedded:legs" if role == "task" else "embedded"
        raise UserError(
            f"{schema} has no {role.replace('_', ' ')} data; use {embedded}, {', '.join(users)} or a local file"
        )
    if role == "harmful_prompts":
        return "test"
    if role != "task":
        return "train"
    if split not in ("train", "test"):
        raise UserError(f"task split must be train or test, not {split!r}")
    if split not in dataset.splits:
        raise UserError(f"{schema} has no {split} split; use it for {', '.join(dataset.splits)} only")
    return split


def load_examples(
    schema: str, role: str, *, location: str | None = None, split: str | None = None
) -> list[Example]:
    """Examples for ``role`` from dataset ``schema`` at ``location`` (hub id or local path).

    ``split`` ("train"/"test") matters for tasks; harmful roles read the training split and test
    prompts the test split. Order is the dataset's: the caller shuffles (or, for test sets, keeps
    the reference's "first N").
    """
    dataset = DATASETS[schema]
    split = check_role(schema, role, split)

    location = location or dataset.hub_id
    path = Path(location).expanduser()
    if path.exists():
        # one file for a harmful role is used whole; tasks and folders pick the split by name
        files, by_name = split_files(path, split if role == "task" or path.is_dir() else None, HUB_SUFFIXES)
        where = str(path)
        rows = read_local_table(files, where)
    else:
        where = f"{location}:{dataset.splits.get(split, split)}"
        rows = read_hub_table(dataset, location, split)
        by_name = True
    _check_columns(rows, dataset, where)
    examples = CONVERTERS[schema](rows, role, where)
    if role == "task" and not by_name and len(dataset.splits) > 1:
        examples = split_by_hash(examples, split)  # a local copy without split names: never train on test
    if schema in ("beavertails", "beavertails_refusals") and role in (
        "alignment",
        "harmful",
        "poison",
        "probe",
    ):
        examples = _harmful_halves(examples, role)
    return examples
