"""Antidote (Huang et al. 2024, arXiv 2408.09600): after the harmful fine-tuning, zero the weights
that matter most to the model's behaviour on harmful data.

The importance of weight W_ij of a linear layer is Wanda's score |W_ij| * ||X_j||_2, where X_j is
the layer's j-th input feature over every (non-padding) token of a small re-alignment set of
harmful pairs. In each output row of each pruned matrix, the ``round(prune_ratio * in_features)``
weights of highest score are set to zero: the top-k is per row, the comparison group of Wanda and of
the reference code (which sorts each row's scores), not global over the model.

Which matrices (``repair.scope``): ``adapter``, as the reference code does with LoRA, prunes the
fine-tuning's trainable weights, the adapter's own lora_A and lora_B of the target layers, each
scored with its own input (x for lora_A, lora_A(x) for lora_B); the base model stays whole. A model
fine-tuned without an adapter is pruned in its target layers' full weights, as the reference does
after full fine-tuning. ``merged`` scores the target layers of the merged fine-tuned model instead,
the base model's weights included.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from booster.adapter_names import lora_target
from booster.errors import UserError


def pruned_per_row(in_features: int, ratio: float) -> int:
    """Weights zeroed in each output row: ratio x in_features rounded half up."""
    return math.floor(ratio * in_features + 0.5)


def has_adapter(model: Any) -> bool:
    """Whether the model carries LoRA matrices that are not merged in."""
    return any(lora_target(name) for name, _ in model.named_modules())


def prunable_layers(model: Any, targets: Iterable[str], scope: str = "merged") -> dict[str, torch.nn.Linear]:
    """The matrices to prune, by module name: with ``scope="adapter"`` on a model with an adapter,
    the lora_A / lora_B linears of the layers named in ``targets``; otherwise the linear layers
    whose name ends in one of ``targets`` (``q_proj``)."""
    targets = set(targets)
    trained = {t for name, _ in model.named_modules() if (t := lora_target(name))}
    if scope == "adapter" and trained:
        layers = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and lora_target(name) in targets
        }
        if not layers:
            raise UserError(
                f"repair.target_modules {sorted(targets)} names no layer the fine-tuned adapter trains "
                f"({sorted(trained)}); name some of those, or set repair.scope: merged"
            )
        return layers
    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }
    if not layers:
        raise UserError(
            f"repair.target_modules {sorted(targets)} names no linear layer of the model; name its "
            "layers by the last part of their name, e.g. [q_proj, k_proj, v_proj]"
        )
    return layers


def input_norms(
    model: Any, layers: dict[str, torch.nn.Linear], batches: Iterable[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """||X_j||_2 of each layer's input features over the batches' non-padding tokens (float64)."""
    sums = {
        name: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device)
        for name, m in layers.items()
    }
    keep: list[torch.Tensor] = []  # the current batch's token mask, seen by the hooks

    def hook(name: str):
        def add(module: Any, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1])[keep[0].reshape(-1)]
            sums[name] += x.double().pow(2).sum(dim=0)

        return add

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                keep[:] = [batch["attention_mask"].bool()]
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total.sqrt() for name, total in sums.items()}


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 for a weight of shape (out, in) and the norms of its ``in`` features."""
    return weight.detach().abs().double() * norms.to(weight.device, torch.float64)[None, :]


def top_fraction_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """True at the :func:`pruned_per_row` highest scores of each row."""
    k = pruned_per_row(scores.shape[1], ratio)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, scores.topk(k, dim=1).indices, True)
    return mask


def antidote_masks(
    model: Any,
    batches: Iterable[dict[str, torch.Tensor]],
    targets: Iterable[str],
    ratio: float,
    scope: str = "merged",
) -> dict[str, torch.Tensor]:
    """Which weights Antidote zeroes: per pruned matrix, a boolean mask of its weight's shape (on
    the CPU), by module name (:func:`prunable_layers`). ``model`` is the fine-tuned model, its
    adapter merged or not; it is not changed."""
    layers = prunable_layers(model, targets, scope)
    norms = input_norms(model, layers, batches)
    return {
        name: top_fraction_mask(wanda_scores(m.weight, norms[name]), ratio).cpu()
        for name, m in layers.items()
    }
