"""A run folder step by step: ``results.json`` kept up to date by ``booster evaluate``, and
``booster ls``, the table of every stage in the folder and its state.

A stage folder is ``<output_dir>/align/<method>-seed<S>-<hash>`` or
``<output_dir>/attack/<method>-seed<S>-p<P>-<hash>``. It is *done* when its ``done.json`` is there,
*partial* when it has a checkpoint to resume from but no ``done.json`` (an interrupted training),
and *failed* when it has neither (it stopped before its first checkpoint, or is training for the
first time right now); an unreadable ``done.json`` is *damaged*.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from booster.config import format_value, short_names
from booster.errors import UserError, warn
from booster.storage import (
    STAGE_KINDS,
    move_aside,
    read_json,
    read_json_file,
    write_json_atomic,
    write_text_atomic,
)

RESULTS = "results.json"
#: ``booster-seed0-p0.1-1a2b3c4d``: method, seed, poison ratio (attack stages) and settings hash.
STAGE_NAME = re.compile(
    r"^(?P<method>.+?)-seed(?P<seed>\d+)(?:-p(?P<ratio>[0-9.e+-]+?))?-(?P<hash>[0-9a-f]{8})$"
)


def _entry_key(entry: dict[str, Any]) -> tuple[Any, ...]:
    """Which evaluated model an entry describes: a newer evaluation of it replaces the entry."""
    sweep = json.dumps(entry.get("sweep") or {}, sort_keys=True)
    return (entry["method"], entry["stage"], entry["seed"], entry["poison_ratio"], sweep)


def _readable_results(path: Path) -> list[dict[str, Any]]:
    """The entries of an existing results.json. A damaged one (cut, not a list of entries) is moved
    aside with one warning line, like a damaged stage: the entries it held come back with
    ``booster report RUN --config CONFIG``, which gathers every finished stage."""

    if not path.exists():
        return []
    results = read_json(path)
    if isinstance(results, list) and all(isinstance(r, dict) for r in results):
        return results
    aside = move_aside(path)
    warn(
        f"{path}: damaged (not a list of results); moved it aside to {aside.name} and starting a new one; "
        f"booster report {path.parent} --config CONFIG gathers every finished stage into it"
    )
    return []


def update_results(root: Path, entries: list[dict[str, Any]], config: Any | None = None) -> Path:
    """Add ``entries`` to ``root/results.json`` or replace the entries of the same models (same
    method, stage, seed, poison ratio and swept values), keeping the order; under a file lock, so
    two ``booster evaluate`` runs on one folder do not lose each other's entries. ``config`` (a
    ``Sweep``) becomes the run's ``config.yaml``, the settings ``booster report`` shows, as
    ``booster run`` writes it."""

    root = Path(root)
    path = root / RESULTS
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{RESULTS}.lock")):
        if config is not None:
            write_text_atomic(root / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        results = _readable_results(path)
        index = {_entry_key(r): i for i, r in enumerate(results)}
        for entry in entries:
            key = _entry_key(entry)
            if key in index:
                results[index[key]] = entry
            else:
                index[key] = len(results)
                results.append(entry)
        write_json_atomic(path, results)
    return path


# -- booster ls ------------------------------------------------------------------------------------


@dataclass
class StageRow:
    """One stage folder as ``booster ls`` shows it."""

    stage: str
    method: str | None
    seed: int | None
    poison_ratio: float | None
    #: the settings that tell the stage apart from the others of its method (swept values from
    #: results.json, and every setting its config.yaml differs in), or None when unknown.
    sweep: dict[str, Any] | None
    status: str
    #: steps trained (done), or reached by the last checkpoint of the total (partial).
    steps: str
    #: evaluations stored in the folder (``eval-*.json``).
    evaluations: int
    path: str


def _checkpoint_steps(stage: Path) -> str | None:
    """``12/50`` from the newest complete checkpoint, or None without one."""
    from transformers.trainer_utils import (
        get_last_checkpoint,  # heavy: loaded only where it is used, so light commands stay fast
    )

    folder = stage / "checkpoints"
    checkpoint = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if checkpoint is None:
        return None
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        return f"{state['global_step']}/{state['max_steps']}"
    except (OSError, ValueError, KeyError):
        return f"{Path(checkpoint).name.split('-')[-1]}/?"


def _sweeps_by_stage(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Stage folder (relative to ``root``) -> the swept values of the entries evaluated on it."""
    path = root / RESULTS
    try:
        results = json.loads(path.read_text()) if path.exists() else []
    except (OSError, ValueError):
        warn(
            f"{path}: damaged (not valid JSON), so swept values are not shown; "
            f"booster report {root} --config CONFIG rebuilds it from the finished stages"
        )
        return {}
    found: dict[str, list[dict[str, Any]]] = {}
    for entry in results if isinstance(results, list) else []:
        if not isinstance(entry, dict):
            continue
        stage = (entry.get("provenance") or {}).get("stage_dir")
        if stage is None and entry.get("evaluation"):  # entries evaluated before provenance existed
            stage = Path(entry["evaluation"]).parent.as_posix()
        if stage is None:
            continue
        sweeps = found.setdefault(stage, [])
        if (entry.get("sweep") or {}) not in sweeps:
            sweeps.append(entry.get("sweep") or {})
    return found


#: settings of a stage's config.yaml that never tell two stage folders apart: trackers, and the
#: ratios of the run (an attack stage's own ratio is its ``p``).
NOT_SETTINGS = ("report_to", "run_name", "poison_ratios")
#: the sections of a stage's config.yaml that made its model.
STAGE_SECTIONS = {
    "align": ("model", "align"),
    "attack": ("model", "align", "attack"),
    "repair": ("model", "align", "attack", "repair"),
}


def _flat(data: Any, prefix: str) -> dict[str, Any]:
    """``{"lora": {"r": 8}}`` -> ``{"model.lora.r": 8}``; a list becomes a tuple (comparable)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}.{key}"))
        return out
    return {prefix: tuple(data) if isinstance(data, list) else data}


def _stage_settings(stage: Path, kind: str) -> dict[str, Any] | None:
    """The settings that made a stage's model, from its config.yaml (None: none, or unreadable)."""
    try:
        data = yaml.safe_load((stage / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None
    settings: dict[str, Any] = {}
    for section in STAGE_SECTIONS[kind]:
        settings.update(_flat(data.get(section) or {}, section))
    return {k: v for k, v in settings.items() if k.rsplit(".", 1)[-1] not in NOT_SETTINGS}


def _differences(settings: list[dict[str, Any] | None]) -> list[dict[str, Any] | None]:
    """For stages of one kind and method: each one's values of the settings they do not all share
    (None where the stage has no readable config.yaml)."""
    known = [s for s in settings if s is not None]
    keys = list(dict.fromkeys(k for s in known for k in s))
    differ = [k for k in keys if len({repr(s.get(k)) for s in known}) > 1]
    return [None if s is None else {k: s.get(k) for k in differ} for s in settings]


def _integer(value: Any) -> Any:
    """A whole float as the integer it is (``epochs: 10.0`` -> 10), a tuple as a list; else as is."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return int(value)
    return list(value) if isinstance(value, tuple) else value


def list_stages(root: Path) -> list[StageRow]:
    """Every align, attack and repair stage folder under ``root``, in that order, by name; each
    with the settings that tell it apart from the other stages of its kind and method."""
    root = Path(root)
    kinds = [k for k in STAGE_KINDS if (root / k).is_dir()]
    if not root.is_dir() or not kinds:
        raise UserError(f"{root}: no align/ or attack/ stage folders here; pass the output_dir of a run")
    sweeps = _sweeps_by_stage(root)
    rows = []
    settings: list[dict[str, Any] | None] = []
    for kind in kinds:
        for stage in sorted(p for p in (root / kind).iterdir() if p.is_dir() and not p.name.endswith(".tmp")):
            match = STAGE_NAME.match(stage.name)
            method = match["method"] if match else None
            seed = int(match["seed"]) if match else None
            ratio = float(match["ratio"]) if match and match["ratio"] else None
            steps = "-"
            marker = stage / "done.json"
            if marker.exists():
                try:
                    done = json.loads(marker.read_text())
                    status, steps = "done", str(done.get("steps", "?"))
                    method, seed = done.get("method", method), done.get("seed", seed)
                    ratio = done.get("poison_ratio", ratio)
                except (OSError, ValueError):
                    status = "damaged"
            elif (reached := _checkpoint_steps(stage)) is not None:
                status, steps = "partial", reached
            else:
                status = "failed"
            found = sweeps.get(f"{kind}/{stage.name}")
            rows.append(
                StageRow(
                    stage=kind,
                    method=method,
                    seed=seed,
                    poison_ratio=ratio,
                    sweep=_merge(found) if found else None,
                    status=status,
                    steps=steps,
                    evaluations=len(list(stage.glob("eval-*.json"))),
                    path=str(stage),
                )
            )
            settings.append(_stage_settings(stage, kind))
    groups: dict[tuple[str, str | None], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row.stage, row.method), []).append(i)
    for members in groups.values():
        for i, differ in zip(members, _differences([settings[i] for i in members]), strict=True):
            if differ is None:
                continue
            swept = rows[i].sweep or {}
            rows[i].sweep = {**swept, **{k: v for k, v in differ.items() if k not in swept}}
    # every row names its settings in the config's order
    order = {k: i for i, k in enumerate(dict.fromkeys(k for s in settings if s for k in s))}
    for row in rows:
        if row.sweep is not None:
            keys = sorted(row.sweep, key=lambda k: order.get(k, len(order)))
            row.sweep = {k: _integer(row.sweep[k]) for k in keys}
    return rows


def _merge(sweeps: list[dict[str, Any]]) -> dict[str, Any]:
    """The swept values an aligned model's cells share (cells that differ only in attack settings
    share one alignment: only the values common to all of them describe it)."""
    common = dict(sweeps[0])
    for other in sweeps[1:]:
        common = {k: v for k, v in common.items() if other.get(k) == v}
    return common


def format_stages(rows: list[StageRow]) -> str:
    """``booster ls``'s table, with a legend of the states that are not done."""

    header = ["stage", "method", "seed", "p", "swept", "status", "steps", "evals", "path"]
    names = short_names(dict.fromkeys(k for row in rows for k in (row.sweep or {})))
    table = [
        [
            row.stage,
            row.method or "?",
            "?" if row.seed is None else str(row.seed),
            "-" if row.poison_ratio is None else f"{row.poison_ratio:g}",
            "?" if row.sweep is None else (_point(row.sweep, names) or "-"),
            row.status,
            row.steps,
            str(row.evaluations),
            row.path,
        ]
        for row in rows
    ]
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [header, *table]]
    counts = {s: sum(r.status == s for r in rows) for s in STATES}
    lines.append(f"{len(rows)} stages: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    lines += [f"  {s}: {STATES[s]}" for s, n in counts.items() if n and s != "done"]
    if any(row.sweep is None for row in rows):
        lines.append("  swept ?: no config.yaml in the stage folder and no evaluation of it in results.json")
    return "\n".join(lines)


def _point(point: dict[str, Any], names: dict[str, str]) -> str:
    """``lr=0.0005, samples=16``: a stage's distinguishing values, named alike in every row."""
    return ", ".join(f"{names.get(k, k)}={format_value(v)}" for k, v in point.items())


#: the states of a stage folder and what each means.
STATES = {
    "done": "trained; its done.json is there",
    "partial": "interrupted; rerunning the command resumes it from its last checkpoint",
    "failed": "no done.json and no checkpoint: it stopped before its first checkpoint (or is running now)",
    "damaged": "its done.json cannot be read; delete the folder to train the stage again",
}


def stages_json(rows: list[StageRow]) -> list[dict[str, Any]]:
    """The rows as JSON: ``steps`` an integer (null when unknown) and, for a partial stage, the
    ``max_steps`` its checkpoint is counting towards."""
    out = []
    for row in rows:
        entry = asdict(row)
        done, _, total = row.steps.partition("/")
        entry["steps"] = int(done) if done.isdigit() else None
        if row.status == "partial":
            entry["max_steps"] = int(total) if total.isdigit() else None
        out.append(entry)
    return out


def load_results(root: Path) -> list[dict]:
    """The run's results.json; a damaged one is a one-line error that says how to rebuild it."""
    path = Path(root) / RESULTS
    results = read_json_file(path, rebuild_hint(root))
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise UserError(f"{path}: not a list of results; {rebuild_hint(root)}")
    return results


def rebuild_hint(root: Path) -> str:
    """How to get a run's results.json back: gather it again from the finished stages."""
    return f"move it aside and rebuild it from the finished stages: booster report {root} --config CONFIG"
