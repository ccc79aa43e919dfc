"""The causal-LM loss every method shares, computed only where labels are scored.

Trainer's built-in loss materialises logits for every position (batch x length x vocab); with
the loss on response tokens only, most of those are thrown away. Running the LM head on the
scored positions alone gives the same value and gradient for less time and memory.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from booster.data.template import IGNORE_INDEX


def _decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """The decoder stack and LM head of a (peft-wrapped) causal LM, if it exposes them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


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
