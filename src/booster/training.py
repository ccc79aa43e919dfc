"""Trainers: a transformers.Trainer that computes the scored-token loss, and Booster on top of it.

``BoosterTrainer`` runs the ordinary Trainer loop (any optimizer, scheduler, clipping, logging,
checkpointing, accumulation) and, once per optimizer step, adds Booster's correction
lamb * (g_h - g_h') to the accumulated gradient. The arithmetic lives in
:func:`booster.methods.booster.booster_correction`; this module only feeds it batches.

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
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from booster.data.template import IGNORE_INDEX
from booster.errors import UserError
from booster.methods.booster import BoosterTerms, booster_correction
from booster.methods.losses import count_scored_tokens, token_loss_sum


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


@dataclass
class BoosterConfig(HarmfulBatchArguments):
    """TrainingArguments plus Booster's hyperparameters (defaults: the paper's)."""

    lamb: float = field(
        default=5.0, metadata={"help": "lambda: weight of the harmful-loss-reduction penalty."}
    )
    alpha: float = field(
        default=0.1, metadata={"help": "alpha: length of the simulated normalised harmful step."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha < 0 or self.lamb < 0:
            raise ValueError(f"lamb and alpha must be >= 0, got lamb={self.lamb}, alpha={self.alpha}")
        if self.fp16:
            # The loss scaler would divide the correction (added to .grad unscaled) by its scale.
            raise UserError("Booster does not support fp16 (no loss scaler in the harmful passes); use bf16")


def default_collator(tokenizer: Any) -> DataCollatorForSeq2Seq:
    """Pads input_ids with the pad token, attention_mask with 0 and labels with -100."""
    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
    )


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


#: one harmful micro-batch -> this rank's share of the mean harmful loss (differentiable).
LossShare = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _is_sharded(param: torch.Tensor) -> bool:
    return hasattr(param, "full_tensor")  # a DTensor (FSDP2 shard)


def _accumulator(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor:
    """A gradient in at least float32 (no copy when it already is), zeros for an unused parameter."""
    dtype = torch.promote_types(param.dtype, torch.float32)
    return torch.zeros_like(param, dtype=dtype) if grad is None else grad.to(dtype)


class LMTrainer(Trainer):
    """Trainer whose loss is the mean cross-entropy over scored response tokens.

    The mean is taken over the whole accumulated batch (Trainer's ``num_items_in_batch``), so
    gradient accumulation reproduces the large-batch gradient. Plain SFT alignment is this class.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("data_collator") is None:
            tokenizer = kwargs.get("processing_class")
            if tokenizer is None:
                raise ValueError("pass processing_class=<tokenizer> (used to pad) or a data_collator")
            kwargs["data_collator"] = default_collator(tokenizer)
        super().__init__(*args, **kwargs)
        # Make Trainer count scored tokens across the accumulated batch for us.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._extra_logs: dict[str, list[float]] = defaultdict(list)

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
            num_items_in_batch = max(count_scored_tokens(inputs["labels"]), 1)
        loss = total / num_items_in_batch
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.args.world_size  # DDP averages gradients; the token count is global
        return (loss, None) if return_outputs else loss

    def log_extra(self, **values: float) -> None:
        """Queue values to be averaged into the next training log line."""
        for key, value in values.items():
            self._extra_logs[key].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._extra_logs:
            for key, values in self._extra_logs.items():
                logs[key] = round(sum(values) / len(values), 6)
            self._extra_logs.clear()
        super().log(logs, start_time)


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
        self.harmful_dataset = harmful_dataset
        self._harmful_iter: Iterator[dict[str, torch.Tensor]] | None = None
        self._harmful_epoch = 0
        self._micro_step = 0

    # -- harmful batches -------------------------------------------------------------------------
    def _harmful_loader(self) -> DataLoader:
        """This rank's shard of the harmful data, reshuffled with seed + pass (same order on all ranks).

        Rank r takes every world-th item of one shared permutation, so the ranks' micro-batches at a
        step together hold the items one process with a world-times larger batch would draw.
        """
        dataset = self.harmful_dataset
        if hasattr(dataset, "column_names"):  # a datasets.Dataset: drop columns the model cannot take
            dataset = self._remove_unused_columns(dataset, description="harmful")
        sampler = DistributedSampler(
            dataset,
            num_replicas=self.args.world_size,
            rank=self.args.process_index,
            shuffle=True,
            seed=self.args.seed + self._harmful_epoch,
        )
        return DataLoader(
            dataset,
            batch_size=self.args.harmful_batch_size,
            sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=0,
        )

    def _next_harmful_cpu_batch(self) -> dict[str, torch.Tensor]:
        if self._harmful_iter is None:
            self._harmful_iter = iter(self._harmful_loader())
        try:
            return next(self._harmful_iter)
        except StopIteration:
            self._harmful_epoch += 1
            self._harmful_iter = iter(self._harmful_loader())
            return next(self._harmful_iter)

    def next_harmful_batch(self) -> dict[str, torch.Tensor]:
        """The next harmful micro-batch of this rank, reshuffling (seed + pass) when it runs out."""
        return self._prepare_inputs(self._next_harmful_cpu_batch())

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
        cpu_batches = [self._next_harmful_cpu_batch() for _ in range(num_micro_batches)]
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
        for p, before, c in zip(params, stash, terms.correction, strict=True):
            c = c.to(p.dtype)
            p.grad = c if before is None else before.add_(c)
        return terms

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
        return booster_correction(params, harmful_grad, self.args.lamb, self.args.alpha, reduce=reduce)

    def _sharded_terms(
        self, model: Any, params: Sequence[torch.Tensor], batches: list, share: LossShare
    ) -> BoosterTerms:
        """FSDP2: backward through FSDP, one reduce-scatter per pass, so .grad holds g_h's shard."""
        from torch.distributed.fsdp import FSDPModule

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
            return booster_correction(params, harmful_grad, self.args.lamb, self.args.alpha)
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
            )
        self._micro_step = (self._micro_step + 1) % self.current_gradient_accumulation_steps
        return super().training_step(model, inputs, num_items_in_batch)
