"""Stages under interruption and damage: verified reuse, damaged stages and checkpoints moved aside,
metrics.jsonl after a resume, atomic writes, locks a killed process leaves behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from booster.config import load_config
from booster.stages.align import align_dir, run_align
from booster.stages.common import JsonlMetrics
from booster.stages.evaluate import evaluation_file, generations_file, run_evaluate
from booster.storage import (
    LOCK,
    METRICS,
    StageBusy,
    checkpoint_problem,
    claimed,
    cut_metrics,
    resume_checkpoint,
    verified_done,
    write_json_atomic,
    write_text_atomic,
)

SMALL = ["methods=[sft]", "align.max_steps=2", "evaluate.harmful_samples=2", "evaluate.task_samples=2"]


def tiny(root: Path, *sets: str):
    return load_config("configs/tiny.yaml", [f"output_dir={root}", *SMALL, *sets])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def damaged_copies(stage: Path) -> list[Path]:
    return sorted(stage.parent.glob(f"{stage.name}.damaged-*"))


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("booster: warning:")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished sft alignment with its evaluation (copied by each test that damages it)."""
    root = tmp_path_factory.mktemp("finished")
    config = tiny(root)
    stage = run_align(config, "sft", 0, progress=False).path
    run_evaluate(config, stage, root, config.attack.task_data, progress=False)
    return root


@pytest.fixture
def run_copy(finished, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(finished, root)
    config = tiny(root)
    return config, root, align_dir(config, "sft", 0)


# -- verified reuse ---------------------------------------------------------------------------------


def test_done_json_records_the_hash_of_every_model_file_and_the_evaluation_its_generations(run_copy):
    config, root, stage = run_copy
    done = json.loads((stage / "done.json").read_text())
    model_files = sorted(p.relative_to(stage).as_posix() for p in (stage / "model").rglob("*") if p.is_file())
    assert "model/adapter_model.safetensors" in model_files and sorted(done["files"]) == model_files
    for name, record in done["files"].items():
        assert record == {"size": (stage / name).stat().st_size, "sha256": sha256(stage / name)}

    evaluation = evaluation_file(config, stage, config.attack.task_data)
    stored = json.loads(evaluation.read_text())
    generations = generations_file(evaluation)
    assert stored["files"] == {
        generations.name: {"size": generations.stat().st_size, "sha256": sha256(generations)}
    }
    metrics, reused = run_evaluate(config, stage, root, config.attack.task_data, progress=False)
    assert reused and "files" not in metrics and metrics["harmful_score"] == stored["harmful_score"]


def test_a_changed_adapter_is_moved_aside_in_one_warning_and_the_stage_trains_again(run_copy, capfd):
    config, root, stage = run_copy
    adapter = stage / "model" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed
    adapter.write_bytes(bytes(data))
    capfd.readouterr()

    result = run_align(config, "sft", 0, progress=False)

    assert not result.reused
    lines = warnings(capfd.readouterr().err)
    assert len(lines) == 1 and "model/adapter_model.safetensors does not match" in lines[0]
    [aside] = damaged_copies(stage)
    assert aside.name in lines[0]
    assert (aside / "model" / "adapter_model.safetensors").read_bytes() == bytes(data)  # kept as it was
    assert (aside / "done.json").exists() and list(aside.glob("eval-*.json"))  # its evaluation went along
    assert (stage / LOCK).exists()  # the lock stays where waiting processes look for it
    assert verified_done(stage) == result.info  # the new model checks out
    assert run_align(config, "sft", 0, progress=False).reused


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda stage: (stage / "done.json").write_text(""), "done.json is empty, cut or unreadable"),
        (
            lambda stage: (stage / "done.json").write_text((stage / "done.json").read_text()[:40]),
            "done.json is empty, cut or unreadable",
        ),
        (lambda stage: (stage / "model" / "adapter_config.json").unlink(), "adapter_config.json is missing"),
        (lambda stage: shutil.rmtree(stage / "model"), "is missing"),
        (lambda stage: (stage / "model" / "adapter_model.safetensors").write_bytes(b""), "does not match"),
    ],
    ids=["empty-done", "cut-done", "missing-config", "missing-model", "empty-weights"],
)
def test_a_damaged_stage_is_moved_aside_not_reused(run_copy, capfd, damage, message):
    _, _, stage = run_copy
    damage(stage)
    capfd.readouterr()
    assert verified_done(stage) is None
    lines = warnings(capfd.readouterr().err)
    assert len(lines) == 1 and message in lines[0] and str(stage) in lines[0]
    [aside] = damaged_copies(stage)
    assert (aside / "config.yaml").exists()
    left = [p.name for p in stage.iterdir()]  # everything but the locks moved aside
    assert LOCK in left and all(name.startswith(".") and name.endswith(".lock") for name in left)


def test_a_done_json_without_hashes_is_trusted_and_gets_them_on_first_reuse(run_copy, capfd):
    config, _, stage = run_copy
    marker = stage / "done.json"
    done = json.loads(marker.read_text())
    legacy = {k: v for k, v in done.items() if k != "files"}
    write_json_atomic(marker, legacy)

    result = run_align(config, "sft", 0, progress=False)

    assert result.reused and not warnings(capfd.readouterr().err)
    assert json.loads(marker.read_text()) == done == result.info


def test_a_done_json_without_hashes_and_a_cut_model_is_moved_aside(run_copy, capfd):
    _, _, stage = run_copy
    write_json_atomic(stage / "done.json", {"recipe": {"adapter": "x"}, "seed": 0})
    adapter = stage / "model" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-10])
    capfd.readouterr()
    assert verified_done(stage) is None
    [line] = warnings(capfd.readouterr().err)
    assert "adapter_model.safetensors" in line and "does not load" in line
    assert len(damaged_copies(stage)) == 1


@pytest.mark.parametrize("damage", ["empty", "cut", "changed-generations"])
def test_a_damaged_evaluation_is_moved_aside_and_evaluated_again(run_copy, capfd, damage):
    config, root, stage = run_copy
    evaluation = evaluation_file(config, stage, config.attack.task_data)
    generations = generations_file(evaluation)
    before = json.loads(evaluation.read_text())
    if damage == "empty":
        evaluation.write_text("")
    elif damage == "cut":
        evaluation.write_text(evaluation.read_text()[:25])
    else:
        generations.write_text(generations.read_text() + "\n")
    capfd.readouterr()

    metrics, reused = run_evaluate(config, stage, root, config.attack.task_data, progress=False)

    assert not reused
    [line] = warnings(capfd.readouterr().err)
    assert evaluation.name in line and "evaluating again" in line
    aside = sorted(stage.glob(f"{evaluation.name}.damaged-*"))
    assert len(aside) == 1 and len(list(stage.glob(f"{generations.name}.damaged-*"))) == 1
    assert metrics["harmful_score"] == before["harmful_score"]  # the same model, evaluated again
    assert run_evaluate(config, stage, root, config.attack.task_data, progress=False)[1]


def test_an_evaluation_without_hashes_is_trusted_and_gets_them(run_copy, capfd):
    config, root, stage = run_copy
    evaluation = evaluation_file(config, stage, config.attack.task_data)
    stored = json.loads(evaluation.read_text())
    write_json_atomic(evaluation, {k: v for k, v in stored.items() if k != "files"})
    metrics, reused = run_evaluate(config, stage, root, config.attack.task_data, progress=False)
    assert reused and not warnings(capfd.readouterr().err)
    assert json.loads(evaluation.read_text()) == stored


# -- locks ------------------------------------------------------------------------------------------

HOLD = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_busy_stage_raises_when_not_waiting_and_a_killed_holder_blocks_nothing(tmp_path):
    config = tiny(tmp_path)
    stage = align_dir(config, "sft", 0)
    stage.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(stage / LOCK)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StageBusy) as busy:
            run_align(config, "sft", 0, progress=False, wait=False)
        assert busy.value.path == stage and not (stage / "done.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (stage / LOCK).exists()  # the lock file outlives its holder, the lock itself does not
    with claimed(stage / LOCK, stage, wait=False):
        pass


# -- checkpoints and metrics.jsonl ------------------------------------------------------------------

RESUMABLE = ["align.max_steps=6", "align.save_steps=2", "align.logging_steps=1"]


def interrupted_at(step: int):
    """Monkeypatch target: raise KeyboardInterrupt once ``step`` is logged (before its checkpoint)."""
    log = JsonlMetrics.on_log

    def on_log(self, args, state, control, logs=None, **kwargs):
        log(self, args, state, control, logs=logs, **kwargs)
        if state.global_step == step:
            raise KeyboardInterrupt

    return on_log


def run_interrupted(config, step: int) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(JsonlMetrics, "on_log", interrupted_at(step))
        with pytest.raises(KeyboardInterrupt):
            run_align(config, "sft", 0, progress=False)


def steps_logged(stage: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (stage / METRICS).read_text().splitlines()]


def losses_logged(stage: Path) -> list[float]:
    rows = [json.loads(line) for line in (stage / METRICS).read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """An sft alignment interrupted after step 3 of 6: checkpoint-2 and metrics for steps 1-3."""
    root = tmp_path_factory.mktemp("checkpointed")
    config = tiny(root, *RESUMABLE)
    run_interrupted(config, 3)
    stage = align_dir(config, "sft", 0)
    assert steps_logged(stage) == [1, 2, 3]
    assert [p.name for p in (stage / "checkpoints").iterdir()] == ["checkpoint-2"]
    return stage


def test_a_resumed_stage_reads_like_an_uninterrupted_one_and_skips_a_damaged_checkpoint(
    checkpointed, tmp_path, capfd
):
    root = tmp_path / "run"
    shutil.copytree(checkpointed.parent.parent, root)
    config = tiny(root, *RESUMABLE)
    stage = align_dir(config, "sft", 0)
    checkpoints = stage / "checkpoints"
    shutil.copytree(checkpoints / "checkpoint-2", tmp_path / "checkpoint-2")

    run_interrupted(config, 5)  # resumes at 2 (metrics cut back to it), saves 4 (and drops 2)
    assert steps_logged(stage) == [1, 2, 3, 4, 5]
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-4"]
    shutil.copytree(tmp_path / "checkpoint-2", checkpoints / "checkpoint-2")
    weights = checkpoints / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # cut short, as by a kill during the save
    (stage / ".done.json.x1.tmp").write_text("{")  # what killed writers leave behind
    (stage / "model.tmp").mkdir()
    capfd.readouterr()

    result = run_align(config, "sft", 0, progress=False)

    [line] = warnings(capfd.readouterr().err)
    assert "checkpoint-4" in line and "adapter_model.safetensors" in line
    assert result.info["resumed_from"].endswith("checkpoint-2") and result.info["steps"] == 6
    assert len(list(stage.glob("checkpoint-4.damaged-*"))) == 1
    assert not (stage / ".done.json.x1.tmp").exists() and not (stage / "model.tmp").exists()

    straight = tiny(tmp_path / "straight", *RESUMABLE)
    run_align(straight, "sft", 0, progress=False)
    reference = align_dir(straight, "sft", 0)
    assert steps_logged(stage) == steps_logged(reference) == [1, 2, 3, 4, 5, 6, 6]
    assert losses_logged(stage) == pytest.approx(losses_logged(reference), rel=1e-5)


@pytest.mark.parametrize(
    "name, damage",
    [
        ("adapter_model.safetensors", "cut"),
        ("trainer_state.json", "empty"),
        ("trainer_state.json", "missing"),
        ("optimizer.pt", "cut"),
        ("optimizer.pt", "flipped"),
        ("scheduler.pt", "empty"),
        ("rng_state.pth", "cut"),
        ("booster_state.safetensors", "cut"),
        ("booster_state.safetensors", "empty"),
    ],
)
def test_a_damaged_checkpoint_is_moved_aside_and_the_one_before_it_used(
    checkpointed, tmp_path, capfd, name, damage
):
    stage = tmp_path / "stage"
    good = stage / "checkpoints" / "checkpoint-2"
    shutil.copytree(checkpointed / "checkpoints" / "checkpoint-2", good)
    newest = stage / "checkpoints" / "checkpoint-4"
    shutil.copytree(good, newest)
    shutil.copy(checkpointed / METRICS, stage / METRICS)
    assert checkpoint_problem(newest) is None
    path = newest / name
    data = path.read_bytes()
    if damage == "cut":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "flipped":  # one byte of the largest tensor's data: a bit flip on disk
        flipped = bytearray(data)
        flipped[largest_member_offset(path)] ^= 0xFF
        path.write_bytes(bytes(flipped))
    else:
        path.unlink()
    capfd.readouterr()

    assert resume_checkpoint(stage) == str(good)

    [line] = warnings(capfd.readouterr().err)
    assert name in line and "checkpoint-4" in line
    assert [p.name for p in (stage / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert len(list(stage.glob("checkpoint-4.damaged-*"))) == 1
    assert steps_logged(stage) == [1, 2]  # cut back to the checkpoint it resumes from

    (good / "trainer_state.json").unlink()
    assert resume_checkpoint(stage) is None  # nothing loadable left: start fresh
    assert not (stage / METRICS).exists()


def largest_member_offset(path: Path) -> int:
    """Where the data of the largest entry of a torch file (a zip archive) starts."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with path.open("rb") as fh:
        fh.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", fh.read(4))
    return info.header_offset + 30 + name_length + extra_length


def test_cut_metrics_drops_later_steps_and_a_half_written_line(tmp_path):
    path = tmp_path / METRICS
    path.write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo'
    )
    cut_metrics(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    cut_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


# -- writes -----------------------------------------------------------------------------------------


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "done.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["done.json"]


def test_written_files_follow_the_umask_not_mkstemp(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "a")
        os.umask(0o002)
        write_json_atomic(tmp_path / "b.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o664
