"""What every defense's trainer shares: the scored-token loss, side-data streams, exact resume,
the guard that stops a run whose loss or gradient stops being finite, and the orderly stop on a
cluster's stop signal (a checkpoint at the current step).

``LMTrainer`` is a transformers ``Trainer`` whose loss is the mean cross-entropy over scored
response tokens (plain SFT alignment is this class). Each defense's trainer subclasses it in the
defense's own module (:mod:`booster.methods.booster`, :mod:`~booster.methods.vaccine`,
:mod:`~booster.methods.repnoise`, :mod:`~booster.methods.lisa`) and changes only what the defense
changes.

Exact resume: Trainer restores the weights, optimizer, scheduler, RNG and the position in the
training data. A defense that draws a second dataset (Booster's and RepNoise's harmful batches,
Lisa's alignment batches) draws it from a :class:`BatchStream`, whose position (pass and batches
drawn) is saved in every checkpoint with the run's loss sum and any tensors the defense keeps
(``checkpoint_state``), so a resumed run takes the same steps as an uninterrupted one, bit for bit.

Length-grouped batches (``train_sampling_strategy="group_by_length"``): every micro-batch, of the
training data and of the side streams, holds rows of similar length, so less of it is padding. The
order is drawn from the seed and the epoch (or pass) alone, so resuming stays exact.
"""

from __future__ import annotations

import json
import os
import signal
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput
from transformers.utils import logging

from booster.data.rows import prepare_dataset
from booster.data.template import IGNORE_INDEX, TEMPLATES
from booster.errors import UserError
from booster.methods.losses import count_scored_tokens, token_loss_sum
from booster.preemption import stop_signal_handlers

logger = logging.get_logger(__name__)

#: the trainer's own resume state inside a ``checkpoint-N`` folder: stream positions, the loss sum
#: so far, and the defense's tensors (safetensors, JSON in the metadata).
STATE_FILE = "booster_state.safetensors"


class TrainingDiverged(UserError):
    """The loss or the gradient became NaN or infinite: the stage stops and saves no model."""


@dataclass
class HarmfulBatchArguments(TrainingArguments):
    """TrainingArguments for methods that also train on a harmful dataset (Booster, RepNoise)."""

    harmful_batch_size: int | None = field(
        default=None,
        metadata={"help": "Harmful micro-batch size per device (default: per_device_train_batch_size)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.harmful_batch_size is None:
            self.harmful_batch_size = self.per_device_train_batch_size
        if self.harmful_batch_size < 1:
            raise ValueError(f"harmful_batch_size must be >= 1, got {self.harmful_batch_size}")


def default_collator(tokenizer: Any) -> DataCollatorForSeq2Seq:
    """Pads input_ids with the pad token, attention_mask with 0 and labels with -100."""
    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
    )


def all_reduce_mean(tensors: list[torch.Tensor], bucket_bytes: int = 1 << 26) -> list[torch.Tensor]:
    """Average ``tensors`` over all ranks in place, in few collectives (flat buckets per dtype)."""
    world = dist.get_world_size()
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(t.device, t.dtype)].append(t)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for i, t in enumerate(group):
            bucket.append(t)
            size += t.numel() * t.element_size()
            if size >= bucket_bytes or i == len(group) - 1:
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat)
                flat.div_(world)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0
    return tensors


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over all ranks (itself in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
    return value


def add_to_grad(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """``p.grad += g`` for each parameter (``p.grad = g`` where it has none yet)."""
    for p, g in zip(params, grads, strict=True):
        g = g.to(p.dtype)
        p.grad = g if p.grad is None else p.grad.add_(g)


#: transformers' name of the length-grouped sampling strategy (``TrainingArguments.train_sampling_strategy``).
GROUP_BY_LENGTH = "group_by_length"
#: micro-batches per group whose rows are sorted by length: large enough that neighbours in a sorted
#: group differ little in length, small enough that each batch is still a random draw of the data.
GROUP_BATCHES = 50


def groups_by_length(args: Any) -> bool:
    """Whether ``args`` (TrainingArguments) ask for length-grouped batches."""
    return getattr(args, "train_sampling_strategy", "random") == GROUP_BY_LENGTH


def row_lengths(dataset: Any) -> list[int]:
    """Tokens of each row of a tokenised dataset (a list of rows or a datasets.Dataset), 0 for a row
    without a scored token (its answer cut away by ``max_length``): such a row trains nothing."""
    if hasattr(dataset, "column_names") and "input_ids" in dataset.column_names:
        labels = dataset["labels"] if "labels" in dataset.column_names else None
        rows = [
            {"input_ids": ids, "labels": None if labels is None else labels[i]}
            for i, ids in enumerate(dataset["input_ids"])
        ]
    else:
        rows = dataset

    def scored(labels: Any) -> bool:
        return labels is None or any(int(t) != IGNORE_INDEX for t in labels)

    return [len(row["input_ids"]) if scored(row.get("labels")) else 0 for row in rows]


def length_grouped_order(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """A random order of the rows whose consecutive ``batch_size``-slices hold rows of similar length.

    The rows are shuffled, cut into groups of ``GROUP_BATCHES`` batches, each group sorted by
    length (longest first) and cut into batches; the full batches are then shuffled, so that long
    and short batches alternate at random through the epoch (no sawtooth of lengths), and the one
    short batch, if any, stays last. Everything random comes from ``generator``. Rows of length 0
    (no scored token) are left out, unless every row is: grouped together they would make steps
    with nothing to learn from, where random batches only carry them along.
    """
    rows = torch.randperm(len(lengths), generator=generator).tolist()
    if any(lengths):
        rows = [i for i in rows if lengths[i] > 0]
    group = batch_size * GROUP_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(rows), group):
        chunk = sorted(rows[start : start + group], key=lambda i: -lengths[i])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    short = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return [i for batch in shuffled + short for i in batch]


def rank_share(lengths: list[int], batch_size: int, world: int, rank: int, seed: int) -> list[int]:
    """Rank ``rank``'s rows of one length-grouped pass: the pass is :func:`length_grouped_order` over
    batches of ``batch_size * world`` rows (padded to a multiple of ``world`` by repeating its first
    rows, as DistributedSampler does), and each rank takes every ``world``-th row of each, so that
    the ranks' micro-batches of a step together form one grouped batch."""
    generator = torch.Generator().manual_seed(seed)
    order = length_grouped_order(lengths, batch_size * world, generator)
    order += order[: -len(order) % world]
    step = batch_size * world
    return [i for k in range(0, len(order), step) for i in order[k : k + step][rank::world]]


class LengthGroupedSampler(Sampler[int]):
    """Row order of :func:`length_grouped_order`, drawn from ``seed`` + the epoch (``set_epoch``,
    which Trainer calls each epoch), so an epoch's order is the same when a run resumes in it."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(length_grouped_order(self.lengths, self.batch_size, generator))

    def __len__(self) -> int:
        return sum(1 for n in self.lengths if n > 0) or len(self.lengths)


class BatchStream:
    """Endless micro-batches of a side dataset (harmful or alignment data) for a trainer.

    Reshuffled with seed + pass when it runs out; under data parallelism each rank takes its shard
    of one shared permutation, so the ranks' micro-batches at a step together hold what one process
    with a world-times larger batch would draw (length-grouped batches: :func:`rank_share`). Its
    position (``state_dict``) travels with every checkpoint, so a resumed run draws the batches the
    uninterrupted run would have drawn.
    """

    def __init__(self, trainer: Any, dataset: Any, batch_size: int, description: str) -> None:
        if dataset is None or len(dataset) == 0:
            raise ValueError(f"{type(trainer).__name__} needs a non-empty {description} dataset")
        self.trainer = trainer
        self.dataset = trainer.prepare_dataset(dataset, f"{description}_dataset")
        self.batch_size = batch_size
        self.description = description
        #: completed passes over the data, and micro-batches drawn in the current pass.
        self.passes = 0
        self.drawn = 0
        self._iter: Iterator[dict[str, torch.Tensor]] | None = None
        self._lengths: list[int] | None = None

    def _loader(self, start: int) -> DataLoader:
        """This pass's micro-batches from the ``start``-th on (the permutation is seed + pass)."""
        args = self.trainer.args
        dataset = self.dataset
        if hasattr(dataset, "column_names"):  # a datasets.Dataset: drop columns the model cannot take
            dataset = self.trainer._remove_unused_columns(dataset, description=self.description)
        if groups_by_length(args):
            order = self._grouped_order(args.seed + self.passes)
        else:
            sampler = DistributedSampler(
                dataset,
                num_replicas=args.world_size,
                rank=args.process_index,
                shuffle=True,
                seed=args.seed + self.passes,
            )
            order = list(sampler)
        order = order[start * self.batch_size :]
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=order, collate_fn=self.trainer.data_collator
        )

    def _grouped_order(self, seed: int) -> list[int]:
        """This rank's rows of one pass in length-grouped batches (seeded like DistributedSampler)."""
        args = self.trainer.args
        if self._lengths is None:
            self._lengths = row_lengths(self.dataset)
        return rank_share(
            self._lengths, self.batch_size, max(int(args.world_size), 1), args.process_index, seed
        )

    def next_raw(self) -> dict[str, torch.Tensor]:
        """The next collated micro-batch, still on the CPU."""
        if self._iter is None:
            self._iter = iter(self._loader(self.drawn))
        try:
            batch = next(self._iter)
        except StopIteration:
            self.passes, self.drawn = self.passes + 1, 0
            self._iter = iter(self._loader(0))
            batch = next(self._iter)
        self.drawn += 1
        return batch

    def next(self) -> dict[str, torch.Tensor]:
        """The next micro-batch on the trainer's device."""
        return self.trainer._prepare_inputs(self.next_raw())

    def state_dict(self) -> dict[str, int]:
        return {"passes": self.passes, "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.passes, self.drawn = int(state["passes"]), int(state["drawn"])
        self._iter = None


class FiniteGuard(TrainerCallback):
    """Stops training when the gradient about to be applied is not finite (NaN or infinite).

    Checked before every optimizer step, so a diverged run never writes a non-finite model; the
    loss is checked in :meth:`LMTrainer.training_step`.
    """

    def __init__(self, trainer: LMTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001
        grads = [p.grad for p in self.trainer.model.parameters() if p.requires_grad and p.grad is not None]
        if grads:
            total = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]).sum()
            if not torch.isfinite(total):
                raise TrainingDiverged(
                    f"the gradient became {float(total)} at step {state.global_step + 1}: training stopped "
                    "and no model was saved; lower the learning rate (or lamb/alpha), or enable max_grad_norm"
                )
        return control


class StopOnSignal(TrainerCallback):
    """Ends training after the optimizer step in which a stop signal came, saving a checkpoint there.

    Under a launch of several processes the ranks agree at every step end (a one-number all-reduce),
    so they stop after the same step even when the signal reaches them at different moments.
    """

    def __init__(self, accelerator: Any = None) -> None:
        self.accelerator = accelerator
        #: the signal this process received, and what stopped the training (set on every rank).
        self.received: str | None = None
        self.stopped_by: str | None = None

    def note(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def _several(self) -> bool:
        return self.accelerator is not None and self.accelerator.num_processes > 1

    def _stop(self, control: Any, agree: bool) -> Any:
        received = self.received is not None
        if agree and self._several():
            flag = torch.tensor([int(received)], device=self.accelerator.device)
            if self.accelerator.reduce(flag, reduction="sum").item() > 0:
                self.stopped_by = self.received or "a stop signal to another process"
        elif received:
            self.stopped_by = self.received
        if self.stopped_by is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        return self._stop(control, agree=True)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        # a signal during the step's logging still saves this step, not the next (one process only:
        # ranks agree at step ends, where every rank is)
        return control if self._several() else self._stop(control, agree=False)


@contextmanager
def stopping_at_step_end(trainer: Any) -> Iterator[StopOnSignal]:
    """Inside the block a stop signal only marks the returned callback, which ends ``trainer``'s
    training with a checkpoint (``stopped_by`` then names the signal); the command's own handling
    comes back after the block, also when training fails."""
    callback = StopOnSignal(trainer.accelerator)
    trainer.add_callback(callback)
    try:
        with stop_signal_handlers(callback.note):
            yield callback
    finally:
        trainer.remove_callback(callback)


class LMTrainer(Trainer):
    """Trainer whose loss is the mean cross-entropy over scored response tokens.

    The mean is taken over the whole accumulated batch (Trainer's ``num_items_in_batch``), so
    gradient accumulation reproduces the large-batch gradient. Plain SFT alignment is this class.

    Every dataset (``train_dataset``, ``eval_dataset`` and a defense's side dataset) may be a
    ``datasets.Dataset`` or a list of raw rows: Alpaca (instruction/input/output),
    prompt/completion or chat ``messages``; they are tokenised with ``template`` (``alpaca``, or
    ``chat``: the tokenizer's chat template) and cut at ``max_length`` tokens, the loss on the
    answer only (:mod:`booster.data.rows`). Tokenised items (``input_ids``, ``labels``) are used
    as they are.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, template: str = "alpaca", max_length: int = 256, **kwargs: Any) -> None:
        if template not in TEMPLATES:
            raise ValueError(f"template={template!r}; use {' or '.join(TEMPLATES)}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.template, self.max_length = template, max_length
        tokenizer = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None:
            if tokenizer is None:
                raise ValueError("pass processing_class=<tokenizer> (used to pad) or a data_collator")
            kwargs["data_collator"] = default_collator(tokenizer)
        if kwargs.get("train_dataset") is not None:
            kwargs["train_dataset"] = self._prepare(kwargs["train_dataset"], tokenizer, "train_dataset")
        evaluation = kwargs.get("eval_dataset")
        if isinstance(evaluation, dict):  # named evaluation sets (a DatasetDict too)
            kwargs["eval_dataset"] = {
                k: self._prepare(v, tokenizer, f"eval_dataset[{k!r}]") for k, v in evaluation.items()
            }
        elif evaluation is not None:
            kwargs["eval_dataset"] = self._prepare(evaluation, tokenizer, "eval_dataset")
        super().__init__(*args, **kwargs)
        # Make Trainer count scored tokens across the accumulated batch for us.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._extra_logs: dict[str, list[float]] = defaultdict(list)
        #: side-data streams by name, positioned on resume (see :class:`BatchStream`).
        self.streams: dict[str, BatchStream] = {}
        #: sum of the step losses before the checkpoint this run resumed from.
        self._loss_sum_before = 0.0
        self.add_callback(FiniteGuard(self))

    def _prepare(self, data: Any, tokenizer: Any, name: str) -> Any:
        return prepare_dataset(data, tokenizer, self.max_length, self.template, name)

    def prepare_dataset(self, data: Any, name: str) -> Any:
        """A side dataset (harmful, alignment) tokenised like ``train_dataset`` if it holds raw rows."""
        return self._prepare(data, self.processing_class, name)

    def add_stream(self, name: str, dataset: Any, batch_size: int) -> BatchStream:
        """A side-data stream (``name`` also names it in errors), positioned on resume."""
        stream = BatchStream(self, dataset, batch_size, name)
        self.streams[name] = stream
        return stream

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        # transformers' own length-grouped sampler draws from the global RNG, which a resume does not
        # put back where the epoch began; this one draws from the data seed and the epoch alone.
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if groups_by_length(self.args) and dataset is not None:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthGroupedSampler(row_lengths(dataset), self._train_batch_size, seed)
        return super()._get_train_sampler(train_dataset)

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> Any:
        # Accelerate casts by patching model.forward; the scored-token loss calls the decoder and the
        # head directly, so it needs the autocast context itself (bf16: a no-op otherwise).
        return self.accelerator.autocast()

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        total = token_loss_sum(model, inputs)
        if num_items_in_batch is None:
            num_items_in_batch = count_scored_tokens(inputs["labels"])
        # a batch without a scored token (every answer cut away by max_length) has loss 0, not 0/0
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.clamp(min=1)
        else:
            num_items_in_batch = max(num_items_in_batch, 1)
        loss = total / num_items_in_batch
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.args.world_size  # DDP averages gradients; the token count is global
        return (loss, None) if return_outputs else loss

    def training_step(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {float(loss)} at step {self.state.global_step + 1}: training stopped and "
                "no model was saved; lower the learning rate (or lamb/alpha), or check the data"
            )
        return loss

    def log_extra(self, **values: float) -> None:
        """Queue values to be averaged into the next training log line."""
        for key, value in values.items():
            self._extra_logs[key].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_runtime" in logs and "train_loss" in logs and self._loss_sum_before:
            logs["train_loss"] = self._whole_run_loss()  # the summary line, as train() returns it
        if "loss" in logs and self._extra_logs:
            for key, values in self._extra_logs.items():
                logs[key] = round(sum(values) / len(values), 6)
            self._extra_logs.clear()
        super().log(logs, start_time)

    # -- exact resume ----------------------------------------------------------------------------------
    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What this trainer needs beside Trainer's own checkpoint to resume exactly: JSON-able
        values and tensors. Subclasses extend both (calling this first)."""
        loss_sum = self._loss_sum_before + self._total_loss_scalar + float(self._tr_loss)
        values = {
            "global_step": self.state.global_step,
            "loss_sum": loss_sum,
            "streams": {name: s.state_dict() for name, s in self.streams.items()},
        }
        return values, {}

    def load_checkpoint_state(self, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self._loss_sum_before = float(values["loss_sum"])
        for name, state in values["streams"].items():
            if name in self.streams:
                self.streams[name].load_state_dict(state)

    def _whole_run_loss(self) -> float:
        """The mean loss over every step of a resumed run (Trainer's own average covers only the
        steps after the resume)."""
        return (self._loss_sum_before + self._total_loss_scalar) / max(self.state.global_step, 1)

    def _needs_checkpoint_state(self) -> bool:
        """Whether resuming needs more than Trainer's own checkpoint (side streams or saved tensors)."""
        return bool(self.streams) or type(self).checkpoint_state is not LMTrainer.checkpoint_state

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # Written before Trainer's files: a checkpoint whose trainer_state.json exists is complete.
        if self.args.should_save:
            from safetensors.torch import (
                save_file,  # heavy: loaded only where it is used, so light commands stay fast
            )

            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            os.makedirs(folder, exist_ok=True)
            values, tensors = self.checkpoint_state()
            tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
            save_file(tensors, os.path.join(folder, STATE_FILE), metadata={"json": json.dumps(values)})
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        path = resume_from_checkpoint
        if path is True:
            from transformers.trainer_utils import (
                get_last_checkpoint,  # heavy: loaded only where it is used, so light commands stay fast
            )

            path = get_last_checkpoint(self.args.output_dir)
        self._loss_sum_before = 0.0
        if isinstance(path, str):
            state_file = os.path.join(path, STATE_FILE)
            if os.path.exists(state_file):
                from safetensors import (
                    safe_open,  # heavy: loaded only where it is used, so light commands stay fast
                )

                with safe_open(state_file, framework="pt") as fh:
                    values = json.loads(fh.metadata()["json"])
                    tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
                self.load_checkpoint_state(values, tensors)
            elif self._needs_checkpoint_state():
                raise UserError(
                    f"{path}: checkpoint has no {STATE_FILE}, so it cannot be resumed exactly; "
                    "delete the checkpoint folder to start the stage again"
                )
            else:  # a checkpoint of an earlier version: the steps are exact, only the loss sum is lost
                logger.warning(
                    f"{path}: no {STATE_FILE}; resuming (the weights are exact; train_loss will average "
                    "only the steps after the resume)"
                )
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        if self._loss_sum_before and self.state.global_step:
            loss = self._whole_run_loss()
            metrics = {**output.metrics, "train_loss": loss}
            output = TrainOutput(output.global_step, loss, metrics)
        return output
