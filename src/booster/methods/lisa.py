"""Lisa: lazy safety alignment (Huang, Hu, Ilhan, Tekin, Liu; NeurIPS 2024, arXiv 2405.18641).

Lisa is a fine-tuning-stage defense: the provider keeps its alignment data and, while it runs
the user's fine-tuning, alternates between two states (Bi-State Optimization):

    alignment state  ``alignment_steps`` optimizer steps on alignment batches (refusals)
    fine-tune state  ``finetune_steps`` optimizer steps on the user's batches

starting with the alignment state. Each state's loss carries a proximal term that pulls the
weights toward where the *other* state last left them,

    loss_state(w) + rho/2 * ||w - w_other||^2      gradient term: rho * (w - w_other),

with w_other saved at every switch (the weights at the end of the state that just ended; both
start as the aligned weights). There is one set of weights and one optimizer; the proximal term
keeps the two states from drifting apart ("lazy" alignment). The alignment stage is plain SFT.

Defaults follow git-disl/Lisa and the copy in git-disl/Booster (``ADMMTrainer``,
``script/finetune/lisa_*.sh``): 100 alignment / 900 fine-tune steps, rho = 0.01, proximal term
only after the first 10% of the steps, alignment steps draw alignment batches *in place of* user
batches (the run has the same number of steps as an undefended attack, and the user batches of
alignment steps go unused). The reference run has 2000 steps (1000 samples, batch 10, 20
epochs), i.e. two cycles; a shorter run whose step counts are not given gets two cycles of half
its length with the same 1:9 split (see :func:`resolve_schedule`).

Departures: the proximal gradient is added once per optimizer step, straight to the gradient
(the reference adds the penalty to every micro-batch loss, which gradient accumulation would
count k times); states switch on optimizer steps, not micro-batches; the anchors and the
alignment stream position survive a resume from checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from booster.training import LMTrainer, add_to_grad

REFERENCE_ALIGNMENT_STEPS = 100
REFERENCE_FINETUNE_STEPS = 900
#: the proximal term is off for the first 10% of the steps (it hurts early convergence, per the reference).
PROXIMAL_START = 0.1

ALIGNMENT = "alignment"
FINETUNE = "finetune"


@dataclass(frozen=True)
class LisaSchedule:
    """Which state each optimizer step is in: cycles of ``alignment_steps`` then ``finetune_steps``."""

    alignment_steps: int
    finetune_steps: int

    def __post_init__(self) -> None:
        if self.alignment_steps < 0 or self.finetune_steps < 0 or self.cycle == 0:
            raise ValueError(
                f"Lisa needs steps >= 0 and a non-empty cycle, got {self.alignment_steps}/{self.finetune_steps}"
            )

    @property
    def cycle(self) -> int:
        return self.alignment_steps + self.finetune_steps

    def phase(self, step: int) -> str:
        """The state of optimizer step ``step`` (0-based)."""
        return ALIGNMENT if step % self.cycle < self.alignment_steps else FINETUNE

    def is_switch(self, step: int) -> bool:
        """Step ``step`` starts a new state (the one before it ended)."""
        return step > 0 and self.phase(step) != self.phase(step - 1)

    def alignment_steps_before(self, step: int) -> int:
        """How many alignment-state steps come before ``step`` (to resume the alignment stream)."""
        full, rest = divmod(step, self.cycle)
        return full * self.alignment_steps + min(rest, self.alignment_steps)


def resolve_schedule(
    alignment_steps: int | None, finetune_steps: int | None, total_steps: int
) -> LisaSchedule:
    """The schedule for a run of ``total_steps`` optimizer steps.

    Given step counts are used as they are. Left unset (None), they are the reference's 100/900;
    a run shorter than two such cycles gets two cycles of ``total_steps // 2`` steps split 1:9
    (each state at least one step), so it alternates like the reference run (2000 steps: A F A F)
    instead of spending all its steps in the first alignment state.
    """
    if (alignment_steps is None) != (finetune_steps is None):
        raise ValueError("set both Lisa step counts or neither (then they follow the reference 100/900)")
    if alignment_steps is not None and finetune_steps is not None:
        return LisaSchedule(alignment_steps, finetune_steps)
    a, f = REFERENCE_ALIGNMENT_STEPS, REFERENCE_FINETUNE_STEPS
    if 0 < total_steps < 2 * (a + f):  # two cycles of total_steps // 2, the reference ratio inside
        cycle = max(total_steps // 2, 2)
        a = max(1, round(cycle * a / (a + f)))
        f = max(1, cycle - a)
    return LisaSchedule(a, f)


def proximal_enabled(step: int, total_steps: int, start: float = PROXIMAL_START) -> bool:
    """The reference turns the proximal term on once more than ``start`` of the steps are done."""
    return step > start * total_steps


def proximal_gradient(
    params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], rho: float
) -> list[torch.Tensor]:
    """Gradient of rho/2 * ||w - w_other||^2: rho * (w - w_other), pointing away from the anchor.

    A descent step along it moves the weights toward the other state's weights.
    """
    return [rho * (p.detach() - a.to(p.dtype)) for p, a in zip(params, anchor, strict=True)]


def proximal_penalty(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], rho: float) -> float:
    """rho/2 * ||w - w_other||^2 (for logging the drift between the states)."""
    total = sum(
        float(torch.sum((p.detach().double() - a.double()) ** 2)) for p, a in zip(params, anchor, strict=True)
    )
    return 0.5 * rho * total


# -- the trainer ------------------------------------------------------------------------------------


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
        self.alignment = self.add_stream(
            "alignment", alignment_dataset, self.args.per_device_train_batch_size
        )
        self.schedule: LisaSchedule | None = None
        #: the other state's weights, per state: where each state last left the trainable weights.
        self.anchors: dict[str, list[torch.Tensor]] | None = None
        self.current_phase: str | None = None
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
                add_to_grad(params, proximal_gradient(params, self.anchors[other], self.args.lisa_rho))
                self.log_extra(
                    lisa_proximal=proximal_penalty(params, self.anchors[other], self.args.lisa_rho)
                )
        return super().training_step(model, inputs, num_items_in_batch)

    # -- resuming: the anchors travel with the checkpoint ----------------------------------------------
    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        values, tensors = super().checkpoint_state()
        if self.anchors is not None:
            for state, weights in self.anchors.items():
                tensors.update({f"anchor.{state}.{i}": t for i, t in enumerate(weights)})
        return values, tensors

    def load_checkpoint_state(self, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().load_checkpoint_state(values, tensors)
        params = self.trainable()
        if f"anchor.{ALIGNMENT}.0" in tensors:
            self.anchors = {
                state: [tensors[f"anchor.{state}.{i}"].to(p.device, p.dtype) for i, p in enumerate(params)]
                for state in (ALIGNMENT, FINETUNE)
            }
