"""Booster's update as one short function (Huang et al., ICLR 2025, arXiv 2409.01586).

Booster minimises  f(w) + lamb * (h(w) - h(w - alpha * grad h(w) / ||grad h(w)||)),
f the alignment loss and h the harmful loss: it penalises how much one simulated, normalised
harmful step would lower the harmful loss. Dropping the Hessian term (the direction is held
fixed), the gradient of the penalty is

    lamb * (grad h(w) - grad h(w'))   with   w' = w - alpha * g_h / (||g_h|| + 1e-7),

||.|| the global L2 norm over all trainable parameters. :func:`booster_correction` computes that
term; :class:`BoosterTrainer` (below) adds it to the alignment gradient before the optimizer
step. It is exactly the gradient of the surrogate F(w) = f(w) + lamb * (h(w) - h(w - alpha * d))
with d held fixed, which the finite-difference test checks.

Under data parallelism (``accelerate launch``) each rank draws its own shard of the harmful data,
the harmful loss is normalised by the global token count, and the update equals the single-process
update of the same global batch:

- DDP: the harmful passes run on the unwrapped module with ``torch.autograd.grad`` (no DDP hook
  fires). g_h is averaged over ranks in one all-reduce (the perturbation needs the global norm and
  direction); g_h' stays local, and the correction is added to ``.grad`` before the first alignment
  backward, so DDP's one all-reduce of the alignment gradient averages it into the exact
  lamb * (g_h - g_h'). Two gradient all-reduces per step instead of three.
- FSDP2 (``fully_shard``): the trainable weights are DTensor shards that the forward does not use
  directly (it all-gathers them into other tensors), so ``torch.autograd.grad`` with respect to
  them returns nothing. The harmful passes therefore run ``backward()`` through FSDP, whose
  reduce-scatter leaves the global-batch gradient's shard in ``.grad`` (once per pass, however many
  micro-batches); the norm is the full tensor's. The correction is a sharded tensor that FSDP's
  reduce-scatter of the alignment gradient adds to.
- DeepSpeed and FSDP1 are refused with a one-line error (see :func:`unsupported_parallelism`).

Booster + ascent (``booster+ascent``) adds a bounded ascent on the harmful loss to the objective,
``- ascent_weight * min(h(w), ascent_target)``: while the harmful batch's loss is below the target
its gradient is ``- ascent_weight * grad h(w)``, which pass 1 already computed (no extra pass); at
or above the target the term is flat, so it cannot push the harmful loss up without end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from booster.errors import UserError
from booster.methods.losses import count_scored_tokens, token_loss_sum
from booster.training import HarmfulBatchArguments, LMTrainer, all_reduce_mean

#: added to the norm as in the reference code, so a zero harmful gradient cannot divide by zero.
NORM_EPS = 1e-7

#: returns (harmful loss, gradients of it w.r.t. the trainable parameters) at the current weights.
HarmfulGradFn = Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]

#: averages tensors over the data-parallel ranks (an all-reduce divided by the number of ranks).
Reduce = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclass
class BoosterTerms:
    """What one Booster step computed: the gradient correction and the quantities we log."""

    correction: list[torch.Tensor]
    harmful_loss: float
    harmful_loss_perturbed: float
    harmful_grad_norm: float
    #: ||lamb * (g_h - g_h')|| (this rank's share under data parallelism).
    correction_norm: float = 0.0
    #: the weight the bounded ascent gave grad h(w) this step: ascent_weight while h(w) < target, else 0.
    ascent: float = 0.0

    @property
    def harmful_loss_reduction(self) -> float:
        """h(w) - h(w'): how much one simulated harmful step lowers the harmful loss."""
        return self.harmful_loss - self.harmful_loss_perturbed


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all tensors taken together, in float32 (or higher) whatever their dtype.

    Sharded tensors (FSDP2 DTensors) give the norm of the full tensors, reduced over their shards,
    so every rank takes the same step.
    """
    norms = [torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]
    total = torch.linalg.vector_norm(torch.stack(norms))
    return total.full_tensor() if hasattr(total, "full_tensor") else total


def ascent_coefficient(harmful_loss: float, weight: float, target: float) -> float:
    """d/dh of ``- weight * min(h, target)`` at ``h``: ``-weight`` below the target, 0 at or above it
    (returned as the positive weight that multiplies ``- grad h``)."""
    return weight if harmful_loss < target else 0.0


def booster_correction(
    params: Sequence[torch.Tensor],
    harmful_grad: HarmfulGradFn,
    lamb: float,
    alpha: float,
    reduce: Reduce | None = None,
    ascent_weight: float = 0.0,
    ascent_target: float = math.inf,
) -> BoosterTerms:
    """lamb * (grad h(w) - grad h(w')) for the trainable ``params``; ``params`` come back bit-exact.

    ``harmful_grad`` evaluates h and its gradient at whatever values ``params`` hold when called
    (over the whole effective harmful batch). The weights are perturbed in place for the second
    call and then restored from a saved copy, not by adding the step back, so no rounding drift
    accumulates in low precision.

    Data parallel: ``harmful_grad`` returns the global loss and this rank's share of the gradient
    (shares average to the global-batch gradient), and ``reduce`` averages g_h so that every rank
    takes the same step, normalised by the global norm. g_h' is not reduced: the correction is this
    rank's share, and averaging the shares gives lamb * (g_h - g_h') exactly. The caller adds it to
    the gradient before the data-parallel average of the alignment gradient, which then carries it
    at no extra communication.

    ``ascent_weight`` > 0 (Booster + ascent) adds the gradient of ``- ascent_weight * min(h(w),
    ascent_target)``: ``- ascent_weight * g_h`` while the (global) harmful loss is below the target.
    """
    loss, grads = harmful_grad()
    if reduce is not None:
        grads = reduce(grads)
    norm = global_norm(grads)
    scale = alpha / (norm + NORM_EPS)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_((g * scale).to(p.dtype))
        loss_perturbed, grads_perturbed = harmful_grad()
    finally:
        with torch.no_grad():
            for p, original in zip(params, saved, strict=True):
                p.copy_(original)
    ascent = ascent_coefficient(float(loss), ascent_weight, ascent_target)
    if ascent:  # lamb * (g_h - g_h') - ascent * g_h, in place
        correction = [
            g.mul_(lamb - ascent).sub_(gp.mul_(lamb)) for g, gp in zip(grads, grads_perturbed, strict=True)
        ]
    else:
        correction = [g.sub_(gp).mul_(lamb) for g, gp in zip(grads, grads_perturbed, strict=True)]
    return BoosterTerms(
        correction=correction,
        harmful_loss=float(loss),
        harmful_loss_perturbed=float(loss_perturbed),
        harmful_grad_norm=float(norm),
        correction_norm=float(global_norm(correction)),
        ascent=ascent,
    )


# -- the trainer ------------------------------------------------------------------------------------


@dataclass
class BoosterConfig(HarmfulBatchArguments):
    """TrainingArguments plus Booster's hyperparameters (defaults: the paper's)."""

    lamb: float = field(
        default=5.0, metadata={"help": "lambda: weight of the harmful-loss-reduction penalty."}
    )
    alpha: float = field(
        default=0.1, metadata={"help": "alpha: length of the simulated normalised harmful step."}
    )
    ascent_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of the bounded harmful-loss ascent - w * min(h, ascent_target) (0: Booster)."
        },
    )
    ascent_target: float = field(
        default=5.0,
        metadata={"help": "harmful loss (nats per token) at and above which the ascent stops."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha < 0 or self.lamb < 0:
            raise ValueError(f"lamb and alpha must be >= 0, got lamb={self.lamb}, alpha={self.alpha}")
        if self.ascent_weight < 0 or not math.isfinite(self.ascent_target):
            raise ValueError(
                f"ascent_weight must be >= 0 and ascent_target finite, got {self.ascent_weight}, "
                f"{self.ascent_target}"
            )
        if self.fp16:
            # The loss scaler would divide the correction (added to .grad unscaled) by its scale.
            raise UserError("Booster does not support fp16 (no loss scaler in the harmful passes); use bf16")


def unsupported_parallelism(
    distributed_type: str, zero_stage: int | None = None, fsdp_version: int | None = None
) -> str | None:
    """Why Booster refuses a parallel set-up, or None when it runs it (README, "Multi-GPU")."""
    if distributed_type == "DEEPSPEED":
        return (
            f"Booster does not run under DeepSpeed (ZeRO stage {zero_stage}): ZeRO owns the gradient "
            "buffers (and from stage 3 the weights), so the Booster correction cannot be added exactly; "
            "use DDP or FSDP2 (configs/accelerate/ddp.yaml or fsdp2.yaml)"
        )
    if distributed_type == "FSDP" and fsdp_version != 2:
        return (
            f"Booster needs FSDP2, not FSDP{fsdp_version} (flat parameters hide the per-parameter "
            "gradients it perturbs with); set fsdp_version: 2 (configs/accelerate/fsdp2.yaml)"
        )
    return None


#: one harmful micro-batch -> this rank's share of the mean harmful loss (differentiable).
LossShare = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _is_sharded(param: torch.Tensor) -> bool:
    return hasattr(param, "full_tensor")  # a DTensor (FSDP2 shard)


def _accumulator(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor:
    """A gradient in at least float32 (no copy when it already is), zeros for an unused parameter."""
    dtype = torch.promote_types(param.dtype, torch.float32)
    return torch.zeros_like(param, dtype=dtype) if grad is None else grad.to(dtype)


class BoosterTrainer(LMTrainer):
    """Booster alignment: ``Trainer`` with a harmful dataset and the Booster gradient correction.

    Both datasets hold dicts with ``input_ids``, ``labels`` (-100 = not scored) and
    ``attention_mask``. The harmful batch is drawn fresh each optimizer step from its own loader:
    with accumulation k, k micro-batches of ``harmful_batch_size`` per rank form one harmful batch,
    over which g_h, the perturbation and g_h' are computed once.
    """

    args: BoosterConfig

    def __init__(self, *args: Any, harmful_dataset: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if harmful_dataset is None or len(harmful_dataset) == 0:
            raise ValueError("BoosterTrainer needs a non-empty harmful_dataset=")
        if not isinstance(self.args, BoosterConfig):
            raise TypeError(
                "BoosterTrainer needs args=BoosterConfig(...) (it carries lamb, alpha, harmful_batch_size)"
            )
        state = self.accelerator.state
        reason = unsupported_parallelism(
            str(state.distributed_type),
            getattr(getattr(state, "deepspeed_plugin", None), "zero_stage", None),
            getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", None),
        )
        if reason:
            raise UserError(reason)
        self.harmful = self.add_stream("harmful", harmful_dataset, self.args.harmful_batch_size)
        self._micro_step = 0
        #: a copy of the step's correction, kept on logged steps to log the alignment gradient's norm.
        self._correction_copy: list[torch.Tensor] | None = None
        self.add_callback(_AlignmentGradNorm(self))

    def next_harmful_batch(self) -> dict[str, torch.Tensor]:
        """The next harmful micro-batch of this rank (the stream reshuffles, seed + pass, when it runs out)."""
        return self.harmful.next()

    # -- helpers for data parallelism --------------------------------------------------------------
    def _sum_over_ranks(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        total = torch.tensor(value, dtype=torch.float64, device=self.args.device)
        dist.all_reduce(total)
        return float(total)

    def _mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.accelerator.num_processes

    def _gradient_sync_now(self) -> bool:
        """Whether the current alignment micro-batch reduces gradients (the last one of the step)."""
        plugin_kwargs = self.accelerator.gradient_state.plugin_kwargs
        return bool(self.accelerator.sync_gradients or plugin_kwargs.get("sync_each_batch", False))

    # -- the step ----------------------------------------------------------------------------------
    def booster_terms(self, model: Any, num_micro_batches: int) -> BoosterTerms:
        """Booster's correction over ``num_micro_batches`` fresh harmful micro-batches per rank."""
        unwrapped = self.accelerator.unwrap_model(model)
        params = [p for p in unwrapped.parameters() if p.requires_grad]
        cpu_batches = [self.harmful.next_raw() for _ in range(num_micro_batches)]
        tokens = self._sum_over_ranks(sum(count_scored_tokens(b["labels"]) for b in cpu_batches))
        batches = [self._prepare_inputs(b) for b in cpu_batches]
        world = self.accelerator.num_processes
        n_tokens = max(tokens, 1.0)

        def share(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            """This rank's part of the mean harmful loss, scaled so that parts average to the mean."""
            with self.compute_loss_context_manager():
                return token_loss_sum(unwrapped, batch) * world / n_tokens

        sharded = [_is_sharded(p) for p in params]
        if any(sharded) and not all(sharded):
            raise UserError("Booster needs all trainable parameters sharded by FSDP2 or none of them")
        stash = [p.grad for p in params]  # alignment gradient so far (None at a step's start)
        for p in params:
            p.grad = None
        was_training = unwrapped.training
        unwrapped.train()
        try:
            if all(sharded):
                terms = self._sharded_terms(unwrapped, params, batches, share)
            else:
                terms = self._replicated_terms(params, batches, share)
        finally:
            unwrapped.train(was_training)
        if self._log_norms_now():
            self._correction_copy = [c.detach().clone() for c in terms.correction]
        for p, before, c in zip(params, stash, terms.correction, strict=True):
            c = c.to(p.dtype)
            p.grad = c if before is None else before.add_(c)
        return terms

    def _log_norms_now(self) -> bool:
        """Whether the step about to run is a logged one (its norms are then worth a copy)."""
        steps = self.args.logging_steps
        return bool(steps) and (self.state.global_step + 1) % max(int(steps), 1) == 0

    def _replicated_terms(
        self, params: Sequence[torch.Tensor], batches: list, share: LossShare
    ) -> BoosterTerms:
        """Single process and DDP: local gradients with torch.autograd.grad, g_h averaged over ranks."""

        def harmful_grad() -> tuple[torch.Tensor, list[torch.Tensor]]:
            total_loss: torch.Tensor | None = None
            total: list[torch.Tensor] | None = None
            for batch in batches:
                loss = share(batch)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                if total is None:
                    total = [_accumulator(g, p) for g, p in zip(grads, params, strict=True)]
                    total_loss = loss.detach()
                else:
                    for acc, g in zip(total, grads, strict=True):
                        if g is not None:
                            acc.add_(g)
                    total_loss = total_loss + loss.detach()
            return self._mean_over_ranks(total_loss), total

        reduce = all_reduce_mean if self.accelerator.num_processes > 1 else None
        return booster_correction(
            params, harmful_grad, self.args.lamb, self.args.alpha, reduce=reduce, **self._ascent()
        )

    def _ascent(self) -> dict[str, float]:
        return {"ascent_weight": self.args.ascent_weight, "ascent_target": self.args.ascent_target}

    def _sharded_terms(
        self, model: Any, params: Sequence[torch.Tensor], batches: list, share: LossShare
    ) -> BoosterTerms:
        """FSDP2: backward through FSDP, one reduce-scatter per pass, so .grad holds g_h's shard."""
        from torch.distributed.fsdp import (
            FSDPModule,  # heavy: loaded only where it is used, so light commands stay fast
        )

        root = next(m for m in model.modules() if isinstance(m, FSDPModule))

        def harmful_grad() -> tuple[torch.Tensor, list[torch.Tensor]]:
            total_loss = torch.zeros((), device=self.args.device)
            for i, batch in enumerate(batches):
                root.set_requires_gradient_sync(i == len(batches) - 1)
                loss = share(batch)
                loss.backward()
                total_loss = total_loss + loss.detach()
            grads = [_accumulator(p.grad, p) for p in params]
            for p in params:
                p.grad = None
            return self._mean_over_ranks(total_loss), grads

        try:
            return booster_correction(params, harmful_grad, self.args.lamb, self.args.alpha, **self._ascent())
        finally:
            root.set_requires_gradient_sync(self._gradient_sync_now())

    def training_step(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        # Once per optimizer step, before the first alignment micro-batch: add lamb * (g_h - g_h').
        if self._micro_step == 0:
            terms = self.booster_terms(model, self.current_gradient_accumulation_steps)
            self.log_extra(
                harmful_loss=terms.harmful_loss,
                harmful_loss_perturbed=terms.harmful_loss_perturbed,
                harmful_loss_reduction=terms.harmful_loss_reduction,
                harmful_grad_norm=terms.harmful_grad_norm,
                **({"harmful_ascent": terms.ascent} if self.args.ascent_weight else {}),
            )
        self._micro_step = (self._micro_step + 1) % self.current_gradient_accumulation_steps
        return super().training_step(model, inputs, num_items_in_batch)


class _AlignmentGradNorm(TrainerCallback):
    """Logs ||grad f|| (the alignment gradient), ||correction|| and their ratio, all three from the
    logged step itself (not averaged over the logging interval, so the ratio is the quotient of
    the two norms on the same line).

    Just before the optimizer step, ``.grad`` holds grad f + correction; the correction's copy
    (taken only on logged steps, so other steps pay no memory for it) gives grad f. These norms
    say whether Booster's term can matter: a correction a thousand times smaller than grad f does
    nothing, one larger than it keeps the model from aligning.
    """

    def __init__(self, trainer: BoosterTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001
        trainer = self.trainer
        copy, trainer._correction_copy = trainer._correction_copy, None
        if copy is None:
            return control
        params = [p for p in trainer.accelerator.unwrap_model(trainer.model).parameters() if p.requires_grad]
        alignment = [
            (p.grad.float() if p.grad is not None else torch.zeros_like(c)) - c.float()
            for p, c in zip(params, copy, strict=True)
        ]
        f_norm = float(global_norm(alignment))
        c_norm = float(global_norm(copy))
        trainer.log_extra(
            alignment_grad_norm=f_norm,
            correction_norm=c_norm,
            correction_to_alignment=c_norm / max(f_norm, 1e-12),
        )
        return control
