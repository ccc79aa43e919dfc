"""``booster archive``: a run folder's measurements, without its weights or generated text.

What ``booster report RUN --config CONFIG`` reads is small: each stage's ``done.json``,
``config.yaml`` and ``metrics.jsonl``, each evaluation file, an aligned model's probe file, and the
per-prompt verdicts that the paired comparisons pool (and per task question whether its answer
was right). An archive holds exactly those, in the run folder's layout, so it can be
committed next to a paper's tables, shared, or grown run after run: archiving another run folder
into the same archive adds its stages (a stage already there is replaced by the newer copy), and
one report then covers all of them. A long study can so run in parts on machines that keep nothing.

Each archived run's config (its ``config.yaml``, written by ``booster run`` and ``booster
evaluate``) is kept under ``configs/``, one file per distinct config, so ``booster report ARCHIVE``
needs no ``--config``: the configs of the parts are merged into the one grid that covers them all
(the union of their seeds, methods, poison ratios and swept values), and parts that differ in any
other setting are an error that asks for ``--config``.

The answers are dropped and each prompt is kept only as its sha256 (the paired comparison matches
prompts by it), so an archive holds no harmful text. What ``booster search`` concluded comes along
(``search/``: its summary, each study's history table, plot and Optuna journal), without its
validation prompts; copying an archive's ``search/`` into an empty run folder lets ``booster search``
go on with the next trial on another machine. An archive is marked (:data:`MARKER`) and no
stage trains into it: its ``done.json`` files vouch for weights it does not have.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from booster.config import SWEEPABLE, RunConfig, format_value, parse_yaml, sweepable_fields
from booster.errors import UserError
from booster.searches import HISTORY, JOURNAL, PLOT, SEARCH_DIR, merge_summary, read_summary
from booster.searches import SUMMARY_JSON as SEARCH_SUMMARY_JSON
from booster.stages.evaluate import FILES, generations_file
from booster.storage import STAGE_KINDS, write_bytes_atomic, write_json_atomic, write_text_atomic
from booster.tasks import row_correct

MARKER = "ARCHIVE.json"
#: the folder of an archive that keeps each archived run's config.
CONFIGS = "configs"
#: the run folder's config (the grid it ran), as ``booster run`` and ``booster evaluate`` write it.
RUN_CONFIG = "config.yaml"
#: settings that only say where a run went or how it was tracked: they never keep parts apart.
IGNORED = ("output_dir", "align.report_to", "align.run_name", "attack.report_to", "attack.run_name")
#: the files of a stage folder that an archive keeps as they are.
STAGE_FILES = ("done.json", "config.yaml", "metrics.jsonl")
KINDS = STAGE_KINDS
#: what an archive keeps of a judged answer (never text).
VERDICT_FIELDS = ("harmful", "refusal", "degenerate", "score")


def prompt_key(prompt: str) -> str:
    """What an archive keeps of a prompt: enough to pair two evaluations, none of its text."""
    return hashlib.sha256(prompt.encode()).hexdigest()


def question_key(row: dict) -> str:
    """What an archive keeps of a generations file's task question (its instruction and input), as
    :func:`prompt_key`."""
    prompt, input_text = str(row.get("prompt")), str(row.get("input") or "")
    return prompt_key(f"{prompt}\n{input_text}" if input_text else prompt)


def verdicts_file(evaluation: Path) -> Path:
    """Where an archive keeps an evaluation's per-prompt verdicts (its generations are not kept)."""
    return evaluation.with_name(evaluation.stem.replace("eval-", "verdicts-") + ".jsonl")


def is_archive(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()


@dataclass
class Archived:
    path: Path
    stages: int
    evaluations: int
    #: evaluations whose generations were missing, so the archive has no verdicts for them.
    without_verdicts: int
    #: whether the run's config.yaml came along (without it the report needs ``--config``).
    config: bool


def archive_run(run_dir: str | Path, dest: str | Path) -> Archived:
    """Copy every finished stage of ``run_dir`` (its measurements only) into the archive ``dest``."""

    run, out = Path(run_dir), Path(dest)
    if not any((run / kind).is_dir() for kind in KINDS):
        raise UserError(f"{run}: no align/ or attack/ stage folders here; pass the output_dir of a run")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; pass a folder for the archive")
    if out.is_dir() and any(out.iterdir()) and not is_archive(out):
        raise UserError(f"{out} holds other files and is not an archive; pass a new or empty folder")
    if out.resolve() == run.resolve():
        raise UserError(f"{out}: the archive must be another folder than the run it archives")
    stages = evaluations = without = 0
    for kind in KINDS:
        for stage in sorted((run / kind).glob("*/")) if (run / kind).is_dir() else []:
            if not (stage / "done.json").is_file() or stage.name.endswith(".tmp"):
                continue  # unfinished, or moved aside: nothing measured to keep
            target = out / kind / stage.name
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            for name in STAGE_FILES:
                if (stage / name).is_file():
                    shutil.copy2(stage / name, target / name)
            for probe in sorted(stage.glob("probe-*.json")):  # an aligned model's probe (numbers only)
                shutil.copy2(probe, target / probe.name)
            for evaluation in sorted(stage.glob("eval-*.json")):
                try:
                    result = json.loads(evaluation.read_text())
                except (OSError, ValueError):
                    continue  # a damaged evaluation is evaluated again by the run, not archived
                result.pop(FILES, None)  # its hashes vouch for the generations, which stay behind
                write_json_atomic(target / evaluation.name, result)
                evaluations += 1
                rows = _verdict_rows(generations_file(evaluation))
                if rows is None:
                    without += 1
                else:
                    write_text_atomic(verdicts_file(target / evaluation.name), "".join(rows))
            stages += 1
    keep_search(run, out)
    config = keep_config(run, out)
    mark_archive(out)
    return Archived(out, stages, evaluations, without, config)


def keep_search(run: Path, out: Path) -> None:
    """Copy what ``booster search`` concluded (its summary, each study's history and plot) into
    ``out``, with each study's Optuna journal (its trials' settings and scores, no text: what a
    search needs to go on elsewhere, kept for a search still under way too), never its validation
    prompts (harmful text)."""
    source, target = run / SEARCH_DIR, out / SEARCH_DIR
    if not source.is_dir():
        return
    copies = []
    for study in sorted(p for p in source.iterdir() if p.is_dir()):
        copies += [Path(study.name, name) for name in (f"{HISTORY}.json", f"{HISTORY}.md", PLOT)]
    for relative in copies:
        if (source / relative).is_file():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / relative, target / relative)
    for journal in sorted(source.glob(f"*/{JOURNAL}")):
        # a running search appends to it: keep only whole records
        data = journal.read_bytes()
        write_bytes_atomic(target / journal.parent.name / JOURNAL, data[: data.rfind(b"\n") + 1])
    # the summary covers the studies of every run archived here; its report.md is the report's to
    # write (`booster report`, and `booster archive` when it ends), pairing from the archive's verdicts
    found = read_summary(run)
    if found:
        target.mkdir(parents=True, exist_ok=True)
        write_json_atomic(target / SEARCH_SUMMARY_JSON, merge_summary(read_summary(out), found))


def keep_config(run: Path, out: Path) -> bool:
    """Copy the run's config.yaml into ``out/configs/``, named by its content (the same config
    archived twice is one file). False when the run has none to copy."""
    source = run / RUN_CONFIG
    if not source.is_file():
        return False
    text = source.read_text()
    write_text_atomic(out / CONFIGS / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml", text)
    return True


def merged_config(folder: Path) -> dict[str, Any] | None:
    """The config that covers every run archived in ``folder`` (with the config the last report
    used, ``folder/config.yaml``): the union of their list settings (seeds, methods, poison ratios,
    swept values), every other setting the same in all of them. None when the archive holds no
    config; a one-line error naming the setting and both files when two parts differ elsewhere."""
    files = sorted((folder / CONFIGS).glob("*.yaml")) + [p for p in [folder / RUN_CONFIG] if p.is_file()]
    merged: dict[str, Any] | None = None
    first = None
    for path in files:
        data = parse_yaml(path.read_text(), path, "; archive the run folder again, or pass --config FILE")
        if not isinstance(data, dict):
            raise UserError(
                f"{path}: not a booster config; archive the run folder again, or pass --config FILE"
            )
        if merged is None:
            merged, first = data, path
            continue
        conflict = _merge_into(merged, data, "")
        if conflict is not None:
            key, a, b = conflict
            raise UserError(
                f"{folder}: its runs differ in {key} ({format_value(a)} in {first}, {format_value(b)} in "
                f"{path}), so no one grid covers them; pass --config FILE to report one of them"
            )
    return merged


def _listed(key: str) -> bool:
    """Whether a setting is a list a grid may extend: seeds, methods, ratios and swept settings."""
    if key in ("seeds", "methods", "attack.poison_ratios"):
        return True
    section, _, name = key.partition(".")
    return section in SWEEPABLE and name in sweepable_fields(section)


def _default(key: str) -> Any:
    """The default of setting ``key`` (``align.compile``, ``model.lora.r``), or None for a key no
    config has."""
    value: Any = RunConfig()
    for name in key.split("."):
        if not is_dataclass(value) or not hasattr(value, name):
            return None
        value = getattr(value, name)
    return asdict(value) if is_dataclass(value) else value


def _merge_into(merged: dict[str, Any], other: dict[str, Any], prefix: str) -> tuple[str, Any, Any] | None:
    """Merge ``other`` into ``merged`` in place; the first setting that cannot merge, or None."""
    for name in dict.fromkeys([*merged, *other]):
        key = f"{prefix}{name}"
        # a config written before a setting existed leaves it out: it ran at the setting's default
        a = merged[name] if name in merged else _default(key)
        b = other[name] if name in other else _default(key)
        if key in IGNORED or a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            if (conflict := _merge_into(a, b, f"{key}.")) is not None:
                return conflict
        elif _listed(key):
            values = [*(a if isinstance(a, list) else [a]), *(b if isinstance(b, list) else [b])]
            union = list(dict.fromkeys(values))
            merged[name] = union if len(union) > 1 else union[0]
        else:
            return key, a, b
    return None


def mark_archive(folder: Path) -> None:
    """Say what the folder is, for people and for :func:`is_archive`."""
    write_json_atomic(
        folder / MARKER,
        {
            "archive": "booster-llm measurements: done.json, config.yaml, metrics.jsonl, evaluations, verdicts",
            "weights": False,
            "answers": False,
            "report": "booster report THIS_FOLDER (its runs' configs are under configs/)",
        },
    )


def _verdict_rows(generations: Path) -> list[str] | None:
    """The rows of a generations file as archive lines, without the answers (None: no readable
    generations file): per harmful prompt its sha256 and the judge's verdict fields, per task
    question its sha256 and whether the answer was right (what the paired FA reads)."""
    try:
        lines = generations.read_text().splitlines()
    except OSError:
        return None
    rows = []
    for line in lines:
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            return None
        if isinstance(row, dict) and "task" in row:
            correct = row_correct(row)
            if correct is not None:
                kept = {"task": row["task"], "prompt_sha256": question_key(row), "correct": correct}
                rows.append(json.dumps(kept) + "\n")
            continue
        if not isinstance(row, dict) or "harmful" not in row:
            continue
        kept = {"prompt_sha256": prompt_key(str(row.get("prompt")))}
        kept.update({k: row[k] for k in VERDICT_FIELDS if k in row})
        rows.append(json.dumps(kept) + "\n")
    return rows
