"""A cluster's stop signal (SIGTERM, or SLURM's early SIGUSR1): a checkpoint at the current step, the
lock released, one line and exit status 75, and a rerun that ends bit for bit where an
uninterrupted run does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from booster.cli import main
from booster.config import load_config
from booster.preemption import EXIT_PREEMPTED, Preempted
from booster.stages.align import align_dir, run_align
from booster.stages.common import JsonlMetrics
from booster.storage import DONE, LOCK, METRICS, claimed
from tests.helpers import patch_everywhere

STEPS = ["align.max_steps=6", "align.save_steps=4", "align.logging_steps=1"]


def tiny(root: Path, *sets: str):
    return load_config("configs/tiny.yaml", [f"output_dir={root}", "methods=[booster]", *STEPS, *sets])


def signalled_at(step: int, signum: int):
    """Monkeypatch target: the process sends itself ``signum`` once ``step`` is logged, mid-training."""
    log = JsonlMetrics.on_log

    def on_log(self, args, state, control, logs=None, **kwargs):
        log(self, args, state, control, logs=logs, **kwargs)
        if state.global_step == step and "loss" in (logs or {}):
            os.kill(os.getpid(), signum)

    return on_log


def metric_rows(stage: Path) -> list[dict]:
    return [json.loads(line) for line in (stage / METRICS).read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    config = tiny(tmp_path_factory.mktemp("straight"))
    return run_align(config, "booster", 0, progress=False).path


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_saves_the_current_step_and_the_rerun_equals_an_uninterrupted_run(
    signum, uninterrupted, tmp_path, monkeypatch
):
    config = tiny(tmp_path)
    stage = align_dir(config, "booster", 0)
    monkeypatch.setattr(JsonlMetrics, "on_log", signalled_at(3, signum))
    with pytest.raises(Preempted) as stopped:
        run_align(config, "booster", 0, progress=False)
    monkeypatch.undo()

    # step 3 is not a periodic checkpoint (save_steps=4): the signal saved it
    assert [p.name for p in (stage / "checkpoints").iterdir()] == ["checkpoint-3"]
    assert not (stage / DONE).exists()
    assert signal.Signals(signum).name in str(stopped.value) and "checkpoint-3" in str(stopped.value)
    with claimed(stage / LOCK, stage, wait=False):  # released: another process could take it now
        pass
    assert signal.getsignal(signum) is signal.SIG_DFL  # the handler is gone with the training

    result = run_align(config, "booster", 0, progress=False)
    assert result.info["resumed_from"].endswith("checkpoint-3") and result.info["steps"] == 6
    adapter = "model/adapter_model.safetensors"
    assert (stage / adapter).read_bytes() == (uninterrupted / adapter).read_bytes()
    # metrics.jsonl reads like the uninterrupted run's: one summary line, at the end, whole-run loss
    rows, reference = metric_rows(stage), metric_rows(uninterrupted)
    assert [r["step"] for r in rows] == [r["step"] for r in reference] == [1, 2, 3, 4, 5, 6, 6]
    assert [("train_runtime" in r) for r in rows] == [False] * 6 + [True]
    assert rows[-1]["train_loss"] == pytest.approx(reference[-1]["train_loss"], rel=1e-6)
    assert result.info["train_loss"] == pytest.approx(rows[-1]["train_loss"], rel=1e-9)


def test_a_resumed_runs_summary_line_averages_the_whole_run(uninterrupted, tmp_path, monkeypatch):
    """The last line of metrics.jsonl after an ordinary interruption and resume (Ctrl-C)."""
    config = tiny(tmp_path, "align.save_steps=2")
    log = JsonlMetrics.on_log

    def interrupt(self, args, state, control, logs=None, **kwargs):
        log(self, args, state, control, logs=logs, **kwargs)
        if state.global_step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(JsonlMetrics, "on_log", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_align(config, "booster", 0, progress=False)
    monkeypatch.undo()
    stage = run_align(config, "booster", 0, progress=False).path
    summary, reference = metric_rows(stage)[-1], metric_rows(uninterrupted)[-1]
    assert summary["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-6)


def test_a_stop_signal_outside_training_stops_the_command_with_its_line(tmp_path, capsys, monkeypatch):
    """A signal while the model loads: nothing trained is lost, one line, exit status 75."""
    import booster.models

    def loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler raises during this wait
        raise AssertionError("the signal did not stop the command")

    patch_everywhere(monkeypatch, booster.models, "load_model_and_tokenizer", loading)
    code = main(["align", "--config", "configs/tiny.yaml", "--output-dir", str(tmp_path), "--no-progress"])
    assert code == EXIT_PREEMPTED
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1] == "booster: stopped by SIGTERM: finished stages are kept; rerun the same command to resume"
    )
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_to_a_running_booster_process_saves_a_checkpoint_and_exits_75(tmp_path):
    """The real thing: a separate ``booster align`` process, sent SIGTERM while it trains."""
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "booster", "align", "--config", "configs/tiny.yaml", "--method", "sft",
        "--output-dir", str(out), "--no-progress", "--set", "align.max_steps=100000",
        "--set", "align.save_steps=100000",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    metrics = None
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        found = list(out.glob(f"align/*/{METRICS}"))
        if found and len(found[0].read_text().splitlines()) >= 2:
            metrics = found[0]
            break
        time.sleep(0.2)
    assert metrics is not None, "the training never logged"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED
    [line] = [x for x in err.splitlines() if x.startswith("booster:")]
    [checkpoint] = list(metrics.parent.glob("checkpoints/checkpoint-*"))
    assert line.startswith("booster: stopped by SIGTERM: saved ") and line.endswith(
        f"{checkpoint.name}; rerun the same command to resume"
    )
    assert not (metrics.parent / DONE).exists()


# -- several processes -------------------------------------------------------------------------------


def _rank_stops(rank: int, world: int, port: int, out: str) -> None:
    """A 2-rank SFT training where only rank 1 gets SIGTERM, after step 2."""
    from transformers import TrainerCallback, TrainingArguments

    from booster.data.template import tokenize_examples
    from booster.models import LoraSettings, add_lora, build_tiny_model, build_tiny_tokenizer
    from booster.training import LMTrainer, stopping_at_step_end
    from tests.helpers import REFUSALS, end_ranks, rank_environment

    rank_environment(rank, world, port)

    class SignalRankOne(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if rank == 1 and state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    tokenizer = build_tiny_tokenizer()
    model = add_lora(build_tiny_model(tokenizer, seed=0), LoraSettings(r=4, alpha=8))
    args = TrainingArguments(
        output_dir=out, max_steps=6, per_device_train_batch_size=1, save_strategy="steps", save_steps=100,
        report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    trainer = LMTrainer(
        model=model, args=args, train_dataset=tokenize_examples(REFUSALS * 4, tokenizer, 64),
        processing_class=tokenizer, callbacks=[SignalRankOne()],
    )  # fmt: skip
    with stopping_at_step_end(trainer) as stop:
        trainer.train()
    Path(out, f"rank{rank}.json").write_text(json.dumps([trainer.state.global_step, stop.stopped_by]))
    end_ranks()


@pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn test")
def test_ranks_that_get_the_signal_at_different_times_stop_after_the_same_step(tmp_path):
    import torch.multiprocessing as mp

    from tests.test_distributed import _free_port

    context = mp.start_processes(
        _rank_stops, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.time() + 240
    while not context.join(timeout=5):  # a rank that did not stop would wait for the other forever
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not stop together")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [[2, "a stop signal to another process"], [2, "SIGTERM"]]
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]
