"""A run folder's files and the rules that keep it trustworthy when runs are interrupted, files get
damaged or several processes share one output folder. Below the stages: it knows files, not training.

- Atomic writes: every file is written under a private name and renamed into place, so a crash never
  leaves half a file (:func:`write_json_atomic`, :func:`write_text_atomic`, :func:`replace_dir`).
- One writer: a stage folder (and each evaluation file in it) is claimed with a file lock
  (:func:`claimed`). The operating system drops the lock when its process dies, so a killed run never
  blocks the next one.
- Verified reuse: ``done.json`` records the size and sha256 of every file of the saved model
  (``files``); a finished stage is reused only while they still match (:func:`verified_done`). A
  damaged stage is moved aside to ``<name>.damaged-<time>`` (kept, never deleted) with one warning
  line, and runs again.
- Resume: an unfinished stage resumes from its newest checkpoint that loads (:func:`resume_checkpoint`);
  a damaged checkpoint is moved aside the same way, and ``metrics.jsonl`` is cut back to the step of
  the checkpoint, so it reads like one uninterrupted run.

Under ``accelerate launch`` every rank runs the stage; the main process holds the locks, checks and
writes the files (atomic renames), and tells the other ranks what it found.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from accelerate.utils import broadcast_object_list
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from transformers.trainer_utils import get_last_checkpoint

from booster.errors import UserError, warn
from booster.models import accelerator_state
from booster.training import STATE_FILE

DONE = "done.json"


METRICS = "metrics.jsonl"


CHECKPOINTS = "checkpoints"
#: the folders of a run that hold stages, in the order they run: alignment, the user's fine-tuning
#: (attack), a post-fine-tuning repair.
STAGE_KINDS = ("align", "attack", "repair")


#: the stage folder's lock file (inside the folder: the folder listing stays one entry per stage).
LOCK = ".lock"


#: files up to this size are hashed whole. Bigger ones (full weights of a large model) are checked by
#: their size and the sha256 of their first and last MiB: that catches a cut or partly written file
#: at a fraction of the cost, but not a change in the middle of a file of the same size.
FULL_HASH_BYTES = 256 * 2**20


ENDS_BYTES = 2**20


#: under a launch of several ranks, how often the main process tells the others it still waits for a lock.
POLL_SECONDS = 5.0


T = TypeVar("T")


class StageBusy(Exception):
    """Another process holds the lock of ``path`` (a stage folder or an evaluation file) right now."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} is being written by another process")
        self.path = path


def _file_mode() -> int:
    """Permissions of a new file under the current umask (mkstemp creates 0600, open() does not)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_atomic(path: Path, write: Callable[[IO[Any]], Any], mode: str = "w") -> None:
    """Write via a temp file in the same folder, then rename: readers see the old or the new file,
    never a half-written one, and a failed write leaves no temp file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())  # the rename must not reach the disk before the data
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temp file and rename, so a crash never leaves a half-written file."""

    def write(fh: IO[str]) -> None:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")

    _write_atomic(path, write)


def write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(path, lambda fh: fh.write(text))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    _write_atomic(path, lambda fh: fh.write(data), mode="wb")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place, replacing an older one."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def remove_orphans(folder: Path, pattern: str = "*.tmp") -> None:
    """Remove temp files and folders a killed process left (call only while holding the folder's lock)."""
    for path in folder.glob(pattern):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing, empty, cut or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_json_file(path: Path, fix: str) -> Any:
    """The parsed file; one that a fault or a hand cut short (not JSON, not text) is a one-line
    :class:`UserError` naming it and what to do (``fix``). A missing file raises ``FileNotFoundError``."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: damaged, not valid JSON ({reason}); {fix}") from None


def read_done(stage_dir: Path) -> dict | None:
    """The stage's done.json as written (None if absent or unreadable); :func:`verified_done` checks it."""
    info = read_json(stage_dir / DONE)
    return info if isinstance(info, dict) else None


def file_record(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file (of its first and last MiB beyond :data:`FULL_HASH_BYTES`)."""
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size <= FULL_HASH_BYTES:
            return {"size": size, "sha256": hashlib.file_digest(fh, "sha256").hexdigest()}
        digest = hashlib.sha256(fh.read(ENDS_BYTES))
        fh.seek(-ENDS_BYTES, os.SEEK_END)
        digest.update(fh.read(ENDS_BYTES))
        return {"size": size, "sha256_ends": digest.hexdigest()}


def file_records(base: Path, paths: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """``{path relative to base: file_record}``, what done.json (or an evaluation) vouches for."""
    return {Path(os.path.relpath(p, base)).as_posix(): file_record(p) for p in sorted(paths)}


def folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def check_files(base: Path, records: Any) -> str | None:
    """What is wrong with the files ``records`` vouches for (missing, unreadable, changed), or None."""
    if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
        return "its file hashes are unreadable"
    for name, expected in records.items():
        path = base / name
        if not path.is_file():
            return f"{name} is missing"
        try:
            actual = file_record(path)
        except OSError as err:
            return f"{name} is unreadable ({err.strerror or err})"
        if actual != expected:
            return f"{name} does not match its recorded hash"
    return None


def load_problem(path: Path) -> str | None:
    """Why a saved file would not load (empty, cut, unreadable), judged by its kind, or None.

    JSON must parse, a safetensors header must cover the whole file, and a torch file (a zip
    archive) must pass its CRC checks; nothing is unpickled.
    """
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "pt"):
                pass
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path) as archive:
                if (bad := archive.testzip()) is not None:
                    return f"{path.name} is damaged ({bad})"
    except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as err:
        return f"{path.name} does not load ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def saved_model_problem(folder: Path) -> str | None:
    """What keeps a saved model (or checkpoint) folder from loading, or None: it needs safetensors
    weights and a config, and every file must load."""
    files = folder_files(folder)
    if not files:
        return f"{folder.name}/ is missing or empty"
    if not any(p.suffix == ".safetensors" for p in files):
        return f"{folder.name}/ has no safetensors weights"
    if not any(p.name in ("config.json", "adapter_config.json") for p in files):
        return f"{folder.name}/ has no config.json or adapter_config.json"
    for path in files:
        if problem := load_problem(path):
            return f"{path.relative_to(folder.parent).as_posix()}: {problem}"
    return None


def move_aside(path: Path, into: Path | None = None, stamp: str | None = None) -> Path:
    """Move a damaged folder or file to ``<name>.damaged-<time>`` (in ``into``, default next to it),
    kept for inspection, never deleted.

    A folder holding lock files (a stage folder) keeps them: a process waiting on one must find the
    same lock, not a new one, so its other entries move into a new folder instead of it being renamed.
    """
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    into = into or path.parent
    aside = into / f"{path.name}.damaged-{stamp}"
    n = 1
    while aside.exists():
        aside = into / f"{path.name}.damaged-{stamp}-{n}"
        n += 1
    if not path.is_dir() or path.is_symlink() or not any(is_lock_file(p) for p in path.iterdir()):
        os.replace(path, aside)
        return aside
    aside.mkdir()
    for entry in path.iterdir():
        if not is_lock_file(entry):
            os.replace(entry, aside / entry.name)
    return aside


def _state() -> Any:
    """Accelerate's view of the launch (:func:`booster.models.accelerator_state`: CPU where training
    runs on the CPU, so that the ranks of an ``accelerate launch --cpu`` are seen)."""
    return accelerator_state()


def is_main_process() -> bool:
    """Rank 0 of a multi-process launch, or the only process."""
    return _state().is_main_process


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block before the others (e.g. filling the shared model cache)."""
    with _state().main_process_first():
        yield


def from_main(value: T) -> T:
    """``value`` as the main process has it, on every rank: the main process decides, all follow."""
    state = _state()
    if state.num_processes == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]


def is_lock_file(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".lock")


@contextlib.contextmanager
def claimed(lock_path: Path, what: Path, wait: bool = True) -> Iterator[None]:
    """Hold ``lock_path`` for the block, so one process at a time writes ``what``.

    ``wait=False`` raises :class:`StageBusy` at once when another process holds the lock, so a
    caller can do other work first. Under a launch of several ranks only the main process takes the
    lock; it polls and tells the others each time, so no rank sits in one collective for hours.
    """
    single = _state().num_processes == 1
    lock = FileLock(lock_path) if is_main_process() else None
    if lock is not None:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        got = False
        if lock is not None:
            try:
                lock.acquire(timeout=(-1 if single else POLL_SECONDS) if wait else 0)
                got = True
            except Timeout:
                pass
        if from_main(got):
            break
        if not wait:
            raise StageBusy(what)
    try:
        yield
        if not single:
            _state().wait_for_everyone()
    finally:
        if lock is not None:
            lock.release()


def verified_done(stage: Path) -> dict | None:
    """The stage's done.json when it is whole and every file it vouches for checks out, else None.

    Main process, stage lock held. A damaged stage is moved aside with one warning line (it then
    runs again). A done.json from before hashes were recorded is trusted when its model folder
    loads, and gets them now.
    """
    if not (stage / DONE).exists():
        return None
    info = read_done(stage)
    if info is None or "recipe" not in info:
        problem = f"{DONE} is empty, cut or unreadable"
    elif "files" in info:
        problem = check_files(stage, info["files"])
    else:
        problem = saved_model_problem(stage / "model")
    if problem is not None:
        aside = move_aside(stage)
        warn(f"{stage}: {problem}; moved it aside to {aside.name} and running the stage again")
        return None
    if "files" not in info:
        info["files"] = file_records(stage, folder_files(stage / "model"))
        write_json_atomic(stage / DONE, info)
    return info


@contextlib.contextmanager
def claim_stage(stage: Path, wait: bool = True) -> Iterator[dict | None]:
    """Hold the stage's lock for the block; yields its verified done.json, or None when the stage has
    to run (temp files a killed run left in the folder are then removed)."""
    with claimed(stage / LOCK, stage, wait):
        done = None
        if is_main_process():
            done = verified_done(stage)
            if done is None:
                remove_orphans(stage)
        yield from_main(done)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why Trainer could not resume from ``checkpoint`` (a missing or damaged file), or None."""
    if not (checkpoint / "trainer_state.json").is_file():
        return "trainer_state.json is missing"
    state = checkpoint / STATE_FILE
    if state.exists():  # the trainer's own resume state (stream positions, loss sum, tensors)
        try:
            with safe_open(str(state), framework="pt") as fh:
                json.loads(fh.metadata()["json"])
                for key in fh.keys():  # noqa: SIM118
                    fh.get_tensor(key)
        except Exception as err:  # any damage: a cut file, bad header, bad JSON
            return f"{STATE_FILE} is damaged ({err.__class__.__name__})"
    return saved_model_problem(checkpoint)


def cut_metrics(path: Path, step: int) -> None:
    """Drop the log lines after ``step``, any line a kill cut short and the summary line of a
    training that stopped early (on a stop signal) from ``metrics.jsonl``."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            summary = isinstance(row, dict) and "train_runtime" in row  # only the run's last line
            if (
                isinstance(row, dict)
                and isinstance(row.get("step"), int)
                and row["step"] <= step
                and not summary
            ):
                kept.append(line if line.endswith("\n") else line + "\n")
    if kept == lines:
        return
    if kept:
        write_text_atomic(path, "".join(kept))
    else:
        path.unlink()


def checkpoint_step(checkpoint: Any) -> int:
    """The step of a ``.../checkpoint-N`` path (0: none or unreadable)."""
    tail = Path(str(checkpoint)).name.rsplit("-", 1)[-1] if checkpoint else ""
    return int(tail) if tail.isdigit() else 0


def in_stage(checkpoint: str | None, stage: Path) -> str | None:
    """The checkpoint a stage resumed from, relative to its stage folder, so that done.json names no
    path of the machine it ran on (an archive or a moved run folder carries it as it is)."""
    if checkpoint is None:
        return None
    try:
        return Path(checkpoint).resolve().relative_to(stage.resolve()).as_posix()
    except ValueError:  # outside the stage (not one booster wrote): kept as given
        return str(checkpoint)


def training_speed(runtime: float, steps: int, resumed_from: str | None) -> dict[str, Any]:
    """done.json's timing of a stage's training: the steps this process trained (those after the
    checkpoint it resumed from) and its training seconds per such step, so a resumed stage's speed
    is not its last process's time spread over steps an earlier one trained."""
    trained = max(steps - checkpoint_step(resumed_from), 0)
    return {"trained_steps": trained, "seconds_per_step": round(runtime / max(trained, 1), 4)}


def stage_time(done: dict[str, Any]) -> tuple[int, float, float] | None:
    """(steps trained, seconds in them, seconds around them) of a finished stage's done.json, in the
    process that finished it: a resumed stage trained only the steps after its checkpoint, and its
    ``seconds`` cover that process alone. ``seconds_per_step`` is that process's training time over
    ``trained_steps``; a done.json without ``trained_steps`` spread it over all the stage's steps.
    None when done.json does not say."""
    steps, seconds, per_step = done.get("steps"), done.get("seconds"), done.get("seconds_per_step")
    if not isinstance(steps, int) or not isinstance(seconds, int | float):
        return None
    trained = steps - checkpoint_step(done.get("resumed_from"))
    if trained <= 0 or seconds <= 0:
        return None
    counted = done.get("trained_steps", steps)
    if isinstance(per_step, int | float) and per_step > 0 and isinstance(counted, int):
        train = min(per_step * counted, seconds)
    else:
        train = seconds
    return trained, train, seconds - train


def resume_checkpoint(stage: Path) -> str | None:
    """The newest checkpoint of an unfinished stage that loads (``transformers``'
    ``get_last_checkpoint``), with ``metrics.jsonl`` cut back to its step; None: start fresh.

    A damaged checkpoint (cut weights, unreadable trainer state, optimizer or RNG file) is moved
    out of the checkpoint folder to ``<stage>/checkpoint-N.damaged-<time>`` with one warning line,
    and the one before it is tried. The main process decides; every rank gets its answer.
    """
    path = None
    if is_main_process():
        folder = stage / CHECKPOINTS
        while folder.is_dir() and (newest := get_last_checkpoint(str(folder))) is not None:
            problem = checkpoint_problem(Path(newest))
            if problem is None:
                path = newest
                break
            aside = move_aside(Path(newest), into=stage)
            warn(f"{newest}: {problem}; moved it aside to {aside.name}, resuming from an earlier point")
        cut_metrics(stage / METRICS, checkpoint_step(path))
    return from_main(path)


def wait_for_everyone() -> None:
    """All processes of a launch meet here (nothing to wait for with one)."""
    state = _state()
    if state.num_processes > 1:
        state.wait_for_everyone()
