"""The causal-LM loss every method shares, computed only where labels are scored.

Trainer's built-in loss materialises logits for every position (batch x length x vocab); with
the loss on response tokens only, most of those are thrown away. Running the LM head on the
scored positions alone gives the same value and gradient for less time and memory.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from booster.data.template import IGNORE_INDEX


def _is_fsdp2(module: Any) -> bool:
    try:
        from torch.distributed.fsdp import (
            FSDPModule,  # heavy: loaded only where it is used, so light commands stay fast
        )
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def _decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """The decoder stack and LM head of a (peft-wrapped) causal LM, if it may run them alone.

    Only a model that runs as it is qualifies. A wrapper (DDP, DeepSpeed) and an FSDP2-sharded model
    must go through their own forward, whose hooks reduce gradients or gather the sharded weights;
    the lookups are on the class so that a wrapper's attribute forwarding cannot get past them.
    """
    base = model.get_base_model() if hasattr(type(model), "get_base_model") else model
    if _is_fsdp2(model) or _is_fsdp2(base):
        return None
    get_decoder = getattr(type(base), "get_decoder", None)
    get_head = getattr(type(base), "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether the innermost causal LM's forward takes ``logits_to_keep`` (transformers >= 4.50)."""
    while hasattr(model, "module"):  # DDP, DeepSpeed
        model = model.module
    if hasattr(type(model), "get_base_model"):
        model = model.get_base_model()
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """At least float32 for the softmax (float64 stays float64, for exact tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def count_scored_tokens(labels: torch.Tensor) -> int:
    """Number of next-token predictions that are scored (labels shift left by one)."""
    return int(labels[..., 1:].ne(IGNORE_INDEX).sum())


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropies over scored positions, in float32.

    Returning a sum (not a mean) lets callers normalise by the token count of a whole
    accumulated batch, so k micro-batches give exactly the gradient of one large batch.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    attention_mask = batch.get("attention_mask")
    targets = labels[:, 1:]
    scored = targets.ne(IGNORE_INDEX)
    parts = _decoder_and_head(model)
    if parts is None and _accepts_logits_to_keep(model):
        # The model's own forward, with logits only at positions scored in some row.
        keep = scored.any(0).nonzero().squeeze(1)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        kept = scored[:, keep]
        return F.cross_entropy(_upcast(logits[kept]), targets[:, keep][kept], reduction="sum")
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        return F.cross_entropy(_upcast(logits[scored]), targets[scored], reduction="sum")
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    logits = _upcast(head(hidden[scored]))
    scale = getattr(getattr(model, "config", None), "logit_scale", None)
    if scale is not None:  # Cohere-style scaled logits
        logits = logits * scale
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if softcap:  # Gemma-2
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets[scored], reduction="sum")
