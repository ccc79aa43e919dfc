"""Trainers for the other defenses, on the same ``LMTrainer`` / ``BoosterTrainer`` footing.

Each runs the ordinary transformers Trainer loop (optimizer, schedule, clipping, logging,
checkpoints, accumulation) and changes only what its method changes; the arithmetic lives in the
method's own module (:mod:`booster.methods.vaccine`, :mod:`~booster.methods.repnoise`,
:mod:`~booster.methods.lisa`):

- ``VaccineTrainer`` (alignment): pass 1 over all micro-batches of the optimizer step records the
  gradient w.r.t. the perturbed layer outputs; pass 2, the trainer's ordinary backward, runs with
  the scaled perturbation hooked onto those outputs.
- ``BoosterVaccineTrainer`` (alignment): Booster's correction plus a Vaccine-style alignment pass
  (the reference's ``perturb_aware``).
- ``RepNoiseTrainer`` (alignment): retain loss plus the MMD-to-noise and log-ascent terms on a
  harmful micro-batch drawn beside each alignment micro-batch.
- ``LisaTrainer`` (the attack, i.e. the user's fine-tuning): alternates alignment and fine-tune
  states on schedule, with the proximal pull toward the other state's last weights.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from booster.methods.booster import global_norm
from booster.methods.lisa import (
    ALIGNMENT,
    FINETUNE,
    PROXIMAL_START,
    LisaSchedule,
    proximal_enabled,
    proximal_gradient,
    proximal_penalty,
    resolve_schedule,
)
from booster.methods.losses import count_scored_tokens, token_loss_sum
from booster.methods.repnoise import harmful_terms, repnoise_penalty
from booster.methods.vaccine import TARGETS, hidden_gradients, perturbation_modules, perturbed, scale_to_norm
from booster.training import BoosterConfig, BoosterTrainer, HarmfulBatchArguments, LMTrainer


class BatchStream:
    """Endless micro-batches of a side dataset (harmful or alignment data) for a trainer.

    Reshuffled with seed + pass when it runs out; under data parallelism each rank takes its shard
    of one shared permutation (as ``BoosterTrainer`` does for its harmful batches).
    """

    def __init__(self, trainer: Any, dataset: Any, batch_size: int, description: str) -> None:
        if dataset is None or len(dataset) == 0:
            raise ValueError(f"{type(trainer).__name__} needs a non-empty {description} dataset")
        self.trainer = trainer
        self.dataset = dataset
        self.batch_size = batch_size
        self.description = description
        self.passes = 0
        self._iter: Iterator[dict[str, torch.Tensor]] | None = None

    def _loader(self) -> DataLoader:
        args = self.trainer.args
        dataset = self.dataset
        if hasattr(dataset, "column_names"):  # a datasets.Dataset: drop columns the model cannot take
            dataset = self.trainer._remove_unused_columns(dataset, description=self.description)
        sampler = DistributedSampler(
            dataset,
            num_replicas=args.world_size,
            rank=args.process_index,
            shuffle=True,
            seed=args.seed + self.passes,
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.trainer.data_collator,
            num_workers=0,
        )

    def next_raw(self) -> dict[str, torch.Tensor]:
        """The next collated micro-batch, still on the CPU."""
        if self._iter is None:
            self._iter = iter(self._loader())
        try:
            return next(self._iter)
        except StopIteration:
            self.passes += 1
            self._iter = iter(self._loader())
            return next(self._iter)

    def next(self) -> dict[str, torch.Tensor]:
        """The next micro-batch on the trainer's device."""
        return self.trainer._prepare_inputs(self.next_raw())

    def skip(self, n: int) -> None:
        """Advance by ``n`` micro-batches (to resume where an interrupted run stopped)."""
        for _ in range(n):
            self.next_raw()


def _sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
    return value


def _add_to_grad(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        g = g.to(p.dtype)
        p.grad = g if p.grad is None else p.grad.add_(g)


# -- Vaccine -----------------------------------------------------------------------------------------


def _rho_field() -> Any:
    return field(
        default=2.0, metadata={"help": "Vaccine's rho: global L2 norm of the hidden-state perturbation."}
    )


def _target_field() -> Any:
    return field(
        default="attention",
        metadata={
            "help": "Perturbed outputs: 'attention' (reference code) or 'decoder' (each layer's output)."
        },
    )


def _check_vaccine(args: Any) -> None:
    if args.vaccine_rho < 0:
        raise ValueError(f"vaccine_rho must be >= 0, got {args.vaccine_rho}")
    if args.vaccine_target not in TARGETS:
        raise ValueError(f"vaccine_target must be one of {TARGETS}, got {args.vaccine_target!r}")


@dataclass
class VaccineConfig(TrainingArguments):
    """TrainingArguments plus Vaccine's rho and where it perturbs (defaults: the reference's)."""

    vaccine_rho: float = _rho_field()
    vaccine_target: str = _target_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_vaccine(self)


@dataclass
class BoosterVaccineConfig(BoosterConfig):
    """BoosterConfig plus Vaccine's rho and target, for Booster with a Vaccine-style alignment pass."""

    vaccine_rho: float = _rho_field()
    vaccine_target: str = _target_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_vaccine(self)


class VaccineMixin:
    """Makes the alignment pass of an ``LMTrainer`` subclass perturbation-aware (Vaccine).

    Once per optimizer step, before the first micro-batch, pass 1 runs on every micro-batch of the
    step (Trainer's ``get_batch_samples`` hands them over) and the perturbations are scaled by one
    norm over all of them and all ranks, so accumulation k equals one k times larger batch. Each
    micro-batch's ordinary loss (``compute_loss``) then runs with its perturbation hooked on; the
    hooks exist only inside that call.
    """

    args: Any

    def _init_vaccine(self) -> None:
        self._vaccine_pending: list[Any] | None = None
        self._vaccine_queue: list[list[torch.Tensor]] = []
        self._vaccine_active: list[torch.Tensor] | None = None

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)  # type: ignore[misc]
        self._vaccine_pending = batches
        self._vaccine_queue = []
        return batches, num_items

    def vaccine_perturbations(
        self, model: Any, batches: list[dict[str, torch.Tensor]], num_items_in_batch: Any
    ) -> list[list[torch.Tensor]]:
        """Pass 1 on ``batches``: per micro-batch, eps_l = rho * g_l / ||g|| with one global norm."""
        trainer: Any = self
        unwrapped = trainer.accelerator.unwrap_model(model)
        modules = perturbation_modules(unwrapped, self.args.vaccine_target)
        prepared = [trainer._prepare_inputs(b) for b in batches]
        if num_items_in_batch is None:
            num_items_in_batch = max(sum(count_scored_tokens(b["labels"]) for b in prepared), 1)

        def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with trainer.compute_loss_context_manager():
                return token_loss_sum(unwrapped, batch) / num_items_in_batch

        was_training = unwrapped.training
        unwrapped.train()
        try:
            results = [hidden_gradients(modules, functools.partial(loss_fn, b)) for b in prepared]
        finally:
            unwrapped.train(was_training)
        local = global_norm([g for _, grads in results for g in grads])
        norm = _sum_over_ranks(local.pow(2)).sqrt()
        trainer.log_extra(
            loss_unperturbed=float(sum(float(loss) for loss, _ in results)),
            vaccine_hidden_grad_norm=float(norm),
        )
        return [scale_to_norm(grads, self.args.vaccine_rho, norm) for _, grads in results]

    def training_step(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        if not self._vaccine_queue:
            pending = self._vaccine_pending
            batches = pending if pending and pending[0] is inputs else [inputs]
            self._vaccine_pending = None
            self._vaccine_queue = self.vaccine_perturbations(model, batches, num_items_in_batch)
        self._vaccine_active = self._vaccine_queue.pop(0)
        try:
            return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        finally:
            self._vaccine_active = None

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        parent = super().compute_loss  # type: ignore[misc]
        if self._vaccine_active is None:  # evaluation, or Booster's own passes
            return parent(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        unwrapped = self.accelerator.unwrap_model(model)  # type: ignore[attr-defined]
        with perturbed(perturbation_modules(unwrapped, self.args.vaccine_target), self._vaccine_active):
            return parent(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


class VaccineTrainer(VaccineMixin, LMTrainer):
    """Vaccine alignment: SFT whose gradient is taken with the layer outputs perturbed (norm rho)."""

    args: VaccineConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not hasattr(self.args, "vaccine_rho"):
            raise TypeError(
                "VaccineTrainer needs args=VaccineConfig(...) (it carries vaccine_rho, vaccine_target)"
            )
        self._init_vaccine()


class BoosterVaccineTrainer(VaccineMixin, BoosterTrainer):
    """Booster + Vaccine: lamb * (g_h - g_h') plus the perturbation-aware alignment gradient.

    The harmful passes of Booster see the plain model (they do not go through ``compute_loss``);
    only the alignment pass is perturbed, as in the reference's ``perturb_aware``.
    """

    args: BoosterVaccineConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not hasattr(self.args, "vaccine_rho"):
            raise TypeError("BoosterVaccineTrainer needs args=BoosterVaccineConfig(...)")
        self._init_vaccine()


# -- RepNoise ----------------------------------------------------------------------------------------


@dataclass
class RepNoiseConfig(HarmfulBatchArguments):
    """TrainingArguments plus RepNoise's weights (defaults: the reference script's)."""

    repnoise_alpha: float = field(
        default=0.1, metadata={"help": "alpha: weight of -log(harmful loss + 1), the gradient-ascent term."}
    )
    repnoise_beta: float = field(
        default=0.001, metadata={"help": "beta: weight of the MMD between harmful hidden states and noise."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.repnoise_alpha < 0 or self.repnoise_beta < 0:
            raise ValueError("repnoise_alpha and repnoise_beta must be >= 0")


class RepNoiseTrainer(LMTrainer):
    """RepNoise alignment: retain loss + beta * MMD(harmful hidden states, noise) - alpha * log(h + 1).

    Every alignment micro-batch is paired with a fresh harmful micro-batch; the harmful terms of
    the k micro-batches of a step are averaged (divided by k), the retain loss is the step's mean.
    """

    args: RepNoiseConfig

    def __init__(self, *args: Any, harmful_dataset: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, RepNoiseConfig):
            raise TypeError("RepNoiseTrainer needs args=RepNoiseConfig(...)")
        self.harmful = BatchStream(self, harmful_dataset, self.args.harmful_batch_size, "harmful")
        #: the Gaussian noise has its own generator (seed + rank), so it does not depend on what else
        #: draws random numbers and a run is reproducible.
        self.noise_generator = torch.Generator(device=self.args.device).manual_seed(
            self.args.seed + self.args.process_index
        )

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        retain = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if model.training:
            terms = harmful_terms(
                self.accelerator.unwrap_model(model), self.harmful.next(), generator=self.noise_generator
            )
            penalty = repnoise_penalty(
                terms.noise_mmd, terms.harmful_loss, self.args.repnoise_alpha, self.args.repnoise_beta
            )
            micro_batches = getattr(self, "current_gradient_accumulation_steps", 1) or 1
            self.log_extra(
                retain_loss=float(retain.detach()) / (self.args.world_size if self._scaled_by_world() else 1),
                repnoise_mmd=float(terms.noise_mmd.detach()),
                repnoise_harmful_loss=float(terms.harmful_loss.detach()),
                harmful_loss=float(terms.harmful_loss_final),
            )
            loss = retain + penalty / micro_batches
        else:
            loss = retain
        return (loss, None) if return_outputs else loss

    def _scaled_by_world(self) -> bool:
        return bool(self.args.average_tokens_across_devices and self.args.world_size > 1)


# -- Lisa --------------------------------------------------------------------------------------------

ANCHORS_FILE = "lisa_anchors.safetensors"


@dataclass
class LisaConfig(TrainingArguments):
    """TrainingArguments plus Lisa's schedule and proximal weight (defaults: the reference's)."""

    lisa_alignment_steps: int | None = field(
        default=None,
        metadata={"help": "Steps per alignment state (None: reference 100, scaled to short runs)."},
    )
    lisa_finetune_steps: int | None = field(
        default=None,
        metadata={"help": "Steps per fine-tune state (None: reference 900, scaled to short runs)."},
    )
    lisa_rho: float = field(
        default=0.01, metadata={"help": "rho of the proximal term rho/2 ||w - w_other||^2."}
    )
    lisa_proximal_start: float = field(
        default=PROXIMAL_START,
        metadata={"help": "Fraction of the steps after which the proximal term is on."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lisa_rho < 0:
            raise ValueError(f"lisa_rho must be >= 0, got {self.lisa_rho}")
        if (self.lisa_alignment_steps is None) != (self.lisa_finetune_steps is None):
            raise ValueError("set both lisa_alignment_steps and lisa_finetune_steps, or neither")


class LisaTrainer(LMTrainer):
    """Lisa's fine-tuning: the user's data and the provider's alignment data in alternating states.

    ``train_dataset`` is the user's data; ``alignment_dataset`` the provider's. On an alignment
    step the user's micro-batches are replaced by alignment micro-batches of the same size (the
    run keeps its length, as in the reference). At each switch the weights are saved as the anchor
    of the state that ended; from ``lisa_proximal_start`` of the run on, rho * (w - w_other) is
    added to each step's gradient, w_other the other state's anchor.
    """

    args: LisaConfig

    def __init__(self, *args: Any, alignment_dataset: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, LisaConfig):
            raise TypeError("LisaTrainer needs args=LisaConfig(...)")
        self.alignment = BatchStream(
            self, alignment_dataset, self.args.per_device_train_batch_size, "alignment"
        )
        self.schedule: LisaSchedule | None = None
        #: the other state's weights, per state: where each state last left the trainable weights.
        self.anchors: dict[str, list[torch.Tensor]] | None = None
        self.current_phase: str | None = None
        self._stream_positioned = False
        self._proximal_due = False

    def trainable(self) -> list[torch.Tensor]:
        return [p for p in self.accelerator.unwrap_model(self.model).parameters() if p.requires_grad]

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.trainable()]

    def _prepare_schedule(self) -> None:
        if self.schedule is None:
            self.schedule = resolve_schedule(
                self.args.lisa_alignment_steps, self.args.lisa_finetune_steps, self.state.max_steps
            )
        if self.anchors is None:  # both states start from the aligned weights
            weights = self._snapshot()
            self.anchors = {ALIGNMENT: weights, FINETUNE: [w.clone() for w in weights]}
        if not self._stream_positioned:  # resume: skip the alignment batches already used
            done = self.schedule.alignment_steps_before(self.state.global_step)
            self.alignment.skip(done * self.args.gradient_accumulation_steps)
            self._stream_positioned = True

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        self._prepare_schedule()
        assert self.schedule is not None and self.anchors is not None
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        step = self.state.global_step
        if self.schedule.is_switch(step):  # the state that just ended leaves its weights as anchor
            self.anchors[self.schedule.phase(step - 1)] = self._snapshot()
        self.current_phase = self.schedule.phase(step)
        if self.current_phase == ALIGNMENT and batches:
            batches = [self.alignment.next_raw() for _ in batches]
            num_items = self._get_num_items_in_batch(batches, device)
        self._proximal_due = bool(batches)
        return batches, num_items

    def training_step(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        if self._proximal_due:  # once per optimizer step, before the first micro-batch
            self._proximal_due = False
            self.log_extra(lisa_alignment_state=float(self.current_phase == ALIGNMENT))
            step = self.state.global_step
            if self.args.lisa_rho > 0 and proximal_enabled(
                step, self.state.max_steps, self.args.lisa_proximal_start
            ):
                assert self.anchors is not None
                other = FINETUNE if self.current_phase == ALIGNMENT else ALIGNMENT
                params = self.trainable()
                _add_to_grad(params, proximal_gradient(params, self.anchors[other], self.args.lisa_rho))
                self.log_extra(
                    lisa_proximal=proximal_penalty(params, self.anchors[other], self.args.lisa_rho)
                )
        return super().training_step(model, inputs, num_items_in_batch)

    # -- resuming: the anchors travel with the checkpoint ----------------------------------------------
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.anchors is None or not self.args.should_save:
            return
        from safetensors.torch import save_file

        folder = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        tensors = {
            f"{state}.{i}": t.detach().cpu().contiguous()
            for state, ts in self.anchors.items()
            for i, t in enumerate(ts)
        }
        save_file(tensors, os.path.join(folder, ANCHORS_FILE))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
        if isinstance(path, str) and os.path.exists(os.path.join(path, ANCHORS_FILE)):
            from safetensors.torch import load_file

            saved = load_file(os.path.join(path, ANCHORS_FILE))
            params = self.trainable()
            self.anchors = {
                state: [saved[f"{state}.{i}"].to(p.device, p.dtype) for i, p in enumerate(params)]
                for state in (ALIGNMENT, FINETUNE)
            }
        return super().train(resume_from_checkpoint, *args, **kwargs)
