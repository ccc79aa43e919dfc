"""Trainers: a transformers.Trainer that computes the scored-token loss, and Booster on top of it.

``BoosterTrainer`` runs the ordinary Trainer loop (any optimizer, scheduler, clipping, logging,
checkpointing, accumulation) and, once per optimizer step, adds Booster's correction
lamb * (g_h - g_h') to the accumulated gradient. The arithmetic lives in
:func:`booster.methods.booster.booster_correction`; this module only feeds it batches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from booster.data.template import IGNORE_INDEX
from booster.methods.booster import BoosterTerms, booster_correction
from booster.methods.losses import count_scored_tokens, token_loss_sum


@dataclass
class BoosterConfig(TrainingArguments):
    """TrainingArguments plus Booster's hyperparameters (defaults: the paper's)."""

    lamb: float = field(
        default=5.0, metadata={"help": "lambda: weight of the harmful-loss-reduction penalty."}
    )
    alpha: float = field(
        default=0.1, metadata={"help": "alpha: length of the simulated normalised harmful step."}
    )
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
        if self.alpha < 0 or self.lamb < 0:
            raise ValueError(f"lamb and alpha must be >= 0, got lamb={self.lamb}, alpha={self.alpha}")


def default_collator(tokenizer: Any) -> DataCollatorForSeq2Seq:
    """Pads input_ids with the pad token, attention_mask with 0 and labels with -100."""
    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
    )


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
    with accumulation k, k micro-batches of ``harmful_batch_size`` form one harmful batch, over
    which g_h, the perturbation and g_h' are computed once.
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
        self.harmful_dataset = harmful_dataset
        self._harmful_iter: Iterator[dict[str, torch.Tensor]] | None = None
        self._harmful_epoch = 0
        self._micro_step = 0

    # -- harmful batches -------------------------------------------------------------------------
    def _harmful_loader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.args.seed + self._harmful_epoch)
        dataset = self.harmful_dataset
        if hasattr(dataset, "column_names"):  # a datasets.Dataset: drop columns the model cannot take
            dataset = self._remove_unused_columns(dataset, description="harmful")
        return DataLoader(
            dataset,
            batch_size=self.args.harmful_batch_size,
            sampler=RandomSampler(dataset, generator=generator),
            collate_fn=self.data_collator,
            num_workers=0,
        )

    def next_harmful_batch(self) -> dict[str, torch.Tensor]:
        """The next harmful micro-batch, reshuffling (seed + pass) when the loader runs out."""
        if self._harmful_iter is None:
            self._harmful_iter = iter(self._harmful_loader())
        try:
            batch = next(self._harmful_iter)
        except StopIteration:
            self._harmful_epoch += 1
            self._harmful_iter = iter(self._harmful_loader())
            batch = next(self._harmful_iter)
        return self._prepare_inputs(batch)

    # -- the step ----------------------------------------------------------------------------------
    def booster_terms(self, model: Any, num_micro_batches: int) -> BoosterTerms:
        """Booster's correction over ``num_micro_batches`` fresh harmful micro-batches."""
        unwrapped = self.accelerator.unwrap_model(model)
        params = [p for p in unwrapped.parameters() if p.requires_grad]
        batches = [self.next_harmful_batch() for _ in range(num_micro_batches)]
        n_tokens = max(sum(count_scored_tokens(b["labels"]) for b in batches), 1)

        def harmful_grad() -> tuple[torch.Tensor, list[torch.Tensor]]:
            total_loss = torch.zeros((), device=params[0].device)
            total_grads = [
                torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params
            ]
            for batch in batches:
                with self.compute_loss_context_manager():
                    loss = token_loss_sum(unwrapped, batch) / n_tokens
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for acc, g in zip(total_grads, grads, strict=True):
                    if g is not None:
                        acc.add_(g)
                total_loss += loss.detach()
            return total_loss, total_grads

        was_training = unwrapped.training
        unwrapped.train()
        terms = booster_correction(params, harmful_grad, lamb=self.args.lamb, alpha=self.args.alpha)
        unwrapped.train(was_training)
        for p, c in zip(params, terms.correction, strict=True):
            c = c.to(p.dtype)
            if p.grad is None:
                p.grad = c
            else:
                p.grad.add_(c)
        return terms

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
