"""Under ``bf16`` a LoRA stage keeps its frozen base weights in bfloat16 while it trains.

Why: bf16 autocast rounds every float32 weight of a linear layer to bfloat16 at each forward pass
(autocast caches the cast only for weights that train), and a Booster step has three forward
passes. Storing the frozen weights of the linear layers in bfloat16 once gives the matrix products
the very same operands (rounding to nearest is rounding to nearest), so the trained adapter is the
same bit for bit (``tests/test_precision.py``), without the casts: a Booster step about 9% faster
on the CPU (docs/performance.md) and less memory.

Only the weights autocast would round anyway are stored so: the frozen ``nn.Linear`` weights of a
peft model, not its adapter, not the embedding (looked up in float32) nor the output projection
(it may share the embedding's weight), not norms. A model without an adapter trains its weights
in float32 and is left alone, as is an FSDP-sharded one (its shards need one dtype per module).
Afterwards the weights are float32 again, holding their rounded values: a stage saves only its
adapter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from booster.adapter_names import lora_target


def autocast_rounded_weights(model: Any) -> list[torch.nn.Parameter]:
    """The frozen linear weights of peft ``model`` that bf16 autocast rounds at every forward pass."""
    if not hasattr(model, "peft_config"):
        return []
    output = model.get_output_embeddings()
    skip = {id(output.weight)} if output is not None else set()
    skip |= {id(p) for p in model.get_input_embeddings().parameters()}
    weights = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or lora_target(name):
            continue
        weight = module.weight
        if weight.requires_grad or weight.dtype != torch.float32 or id(weight) in skip:
            continue
        weights.append(weight)
    return weights


@contextmanager
def frozen_weights_in_bf16(model: Any, enabled: bool) -> Iterator[int]:
    """Within the block, the weights :func:`autocast_rounded_weights` names are stored in bfloat16;
    yields how many. The block must run under bf16 autocast (``enabled`` says it does)."""
    weights = autocast_rounded_weights(model) if enabled else []
    for weight in weights:
        weight.data = weight.data.to(torch.bfloat16)
    try:
        yield len(weights)
    finally:
        for weight in weights:
            weight.data = weight.data.to(torch.float32)
