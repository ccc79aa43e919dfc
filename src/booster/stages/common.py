"""What the stages share: Trainer arguments from a section, atomic writes, stage markers, logging.

Under ``accelerate launch`` every rank runs the stage; files are written by the main process only
(atomic renames), and the other ranks wait for it at the end of the stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from booster.config import AlignConfig, AttackConfig

DONE = "done.json"


def training_kwargs(
    section: AlignConfig | AttackConfig, checkpoint_dir: Path, seed: int, progress: bool
) -> dict:
    """TrainingArguments keyword arguments for a stage section (same mapping for every stage)."""
    use_cuda = torch.cuda.is_available()
    return {
        "output_dir": str(checkpoint_dir),
        "per_device_train_batch_size": section.batch_size,
        "gradient_accumulation_steps": section.gradient_accumulation_steps,
        "learning_rate": section.learning_rate,
        "weight_decay": section.weight_decay,
        "num_train_epochs": section.epochs,
        "max_steps": section.max_steps,
        "lr_scheduler_type": section.lr_scheduler,
        "warmup_steps": section.warmup_ratio,  # transformers >= 5: a float < 1 is a ratio
        "max_grad_norm": section.max_grad_norm,
        "optim": section.optim,
        "bf16": section.bf16,
        "activation_checkpointing": section.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False}
        if section.gradient_checkpointing
        else None,
        "logging_steps": section.logging_steps,
        "save_strategy": "steps" if section.save_steps > 0 else "no",
        "save_steps": max(section.save_steps, 1),
        "save_total_limit": 1,
        "seed": seed,
        "data_seed": seed,
        "report_to": [],
        "disable_tqdm": not progress,
        "use_cpu": not use_cuda,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
    }


def last_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` folder that Trainer wrote, to resume an interrupted run."""
    if not checkpoint_dir.is_dir():
        return None
    found = [p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    found = [p for p in found if (p / "trainer_state.json").exists()]
    return str(max(found, key=lambda p: int(p.name.split("-")[-1]))) if found else None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temp file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place, replacing an older one."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def read_done(stage_dir: Path) -> dict | None:
    marker = stage_dir / DONE
    return json.loads(marker.read_text()) if marker.exists() else None


class JsonlMetrics(TrainerCallback):
    """Appends every Trainer log line to ``metrics.jsonl`` (with the step), for plots and audits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if logs and state.is_world_process_zero:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")


# -- several processes (accelerate launch / torchrun) ---------------------------------------------


def is_main_process() -> bool:
    """Rank 0 of a multi-process launch, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block before the others (e.g. filling the shared model cache)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    from booster.models import accelerator_state

    with accelerator_state().main_process_first():
        yield


def wait_for_everyone() -> None:
    """All processes of a launch meet here (nothing to wait for with one)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from booster.models import accelerator_state

        accelerator_state().wait_for_everyone()


def save_trained(trainer: Any, tokenizer: Any, final: Path) -> None:
    """Save the trained model (adapter or full weights) as ``final``, written by the main process.

    Gathering FSDP2-sharded weights is a collective, so every rank takes part in it; the other
    ranks then wait until the folder is in place.
    """
    from booster.models import save_model

    accelerator = trainer.accelerator
    model = accelerator.unwrap_model(trainer.model)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.num_processes == 1:
        save_model(model, tokenizer, tmp)
        replace_dir(tmp, final)
        return
    state_dict = accelerator.get_state_dict(trainer.model)
    if accelerator.is_main_process:
        model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()


def finish_stage(trainer: Any, stage: Path, info: dict[str, Any]) -> None:
    """Drop the resume points and write the stage's done marker (main process); all ranks wait."""
    if trainer.accelerator.is_main_process:
        shutil.rmtree(stage / "checkpoints", ignore_errors=True)  # the finished model replaces them
        write_json_atomic(stage / DONE, info)
    trainer.accelerator.wait_for_everyone()
