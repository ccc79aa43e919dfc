"""What the stages share: claiming a stage folder and reusing a finished one, and around the
Trainer every log line in ``metrics.jsonl``, the progress bar and trackers, training that stops in
order on a cluster's stop signal, and saving the trained model with the ``done.json`` that vouches
for it (:mod:`booster.storage` keeps the files).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from booster.compilation import compiled_layers
from booster.models import make_readable, save_model
from booster.passthrough import point_trackers_at
from booster.precision import frozen_weights_in_bf16
from booster.preemption import Preempted
from booster.progress import use_stage_progress
from booster.storage import (
    CHECKPOINTS,
    DONE,
    METRICS,
    claim_stage,
    file_records,
    folder_files,
    from_main,
    replace_dir,
    write_json_atomic,
)
from booster.training import stopping_at_step_end


@dataclass
class StageResult:
    path: Path
    reused: bool
    info: dict[str, Any]


def run_after(
    stage: Path,
    wait: bool,
    needed: Callable[[], StageResult],
    work: Callable[[dict[str, Any]], dict[str, Any]],
    reused: Callable[[dict[str, Any]], None] | None = None,
) -> StageResult:
    """Run a stage that builds on another stage's model, or reuse it when it is done.

    With ``stage`` claimed (``wait=False``: :class:`booster.storage.StageBusy` at once when another
    process holds it), a finished stage's done info goes to ``reused`` and is returned as it is;
    otherwise the stage it builds on runs (or is reused) first, through ``needed``, and ``work``
    builds this one from that stage's done info and returns its own.
    """
    with claim_stage(stage, wait) as done:
        if done is not None:
            if reused is not None:
                reused(done)
            return StageResult(stage, True, done)
        info = work(needed().info)
    return StageResult(stage, False, info)


class JsonlMetrics(TrainerCallback):
    """Appends every Trainer log line to ``metrics.jsonl`` (with the step), for plots and audits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if logs and state.is_world_process_zero:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def train_stage(trainer: Any, resume: str | None, compile_layers: bool = False) -> Any:
    """``trainer.train`` from ``resume`` (the decoder layers compiled with ``compile_layers``; under bf16
    the frozen linear weights stored in bfloat16, :mod:`booster.precision`); a stop signal (SIGTERM,
    SIGUSR1) during it saves a checkpoint at the current step and raises
    :class:`booster.preemption.Preempted` naming it."""
    bf16_weights = trainer.args.bf16 and not trainer.is_fsdp_enabled
    with (
        stopping_at_step_end(trainer) as stop,
        compiled_layers(trainer.model, compile_layers),
        frozen_weights_in_bf16(trainer.model, bf16_weights),
    ):
        output = trainer.train(resume_from_checkpoint=resume)
    if stop.stopped_by is not None:
        checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        raise Preempted(stop.stopped_by, saved=str(checkpoint))
    return output


def watch_training(trainer: Any, stage: Path, label: str, progress: bool) -> None:
    """What a stage's training shows and records: every log line in ``metrics.jsonl``, a progress
    bar named ``label`` with one short line per log step, TensorBoard logs in the stage folder."""
    trainer.add_callback(JsonlMetrics(stage / METRICS))
    use_stage_progress(trainer, label, progress)
    point_trackers_at(trainer, stage)


def save_trained(trainer: Any, tokenizer: Any, final: Path) -> None:
    """Save the trained model (adapter or full weights) as ``final``, written by the main process.

    Gathering FSDP2-sharded weights is a collective, so every rank takes part in it; the other
    ranks then wait until the folder is in place.
    """
    accelerator = trainer.accelerator
    model = accelerator.unwrap_model(trainer.model)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.num_processes == 1:
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tokenizer, tmp)
        replace_dir(tmp, final)
        return
    state_dict = accelerator.get_state_dict(trainer.model)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        make_readable(tmp)
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()


def finish_stage(
    trainer: Any, stage: Path, info: dict[str, Any], depends: Iterable[Path] = ()
) -> dict[str, Any]:
    """Drop the resume points and write the stage's done marker (main process); all ranks wait.

    The marker records the size and sha256 of every file of ``model/`` and of the ``depends``
    folders the model is rebuilt from (adapters a double-LoRA attack merges), so the stage is redone
    when any of them changes. Returns the info as written.
    """
    if trainer.accelerator.is_main_process:
        shutil.rmtree(stage / CHECKPOINTS, ignore_errors=True)  # the finished model replaces them
        files = [p for folder in [stage / "model", *depends] for p in folder_files(folder)]
        info = {**info, "files": file_records(stage, files)}
        write_json_atomic(stage / DONE, info)
    return from_main(info)  # every rank returns the info as written
