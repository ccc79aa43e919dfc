"""``align.compile`` / ``attack.compile``: the decoder layers' forward compiled by ``torch.compile`` while
a stage trains.

Why the layers and not the model: every decoder layer runs the same code, so one compiled graph (two:
the first layer's input needs no gradient, the others' do) serves all of them, and compiling costs
seconds of tracing instead of minutes for the whole stack. The embedding, the loss on the scored
positions, the head and hooks on the layers themselves stay eager (hooks on modules inside a layer
are traced into its graph: why Vaccine's alignment refuses it). The key-value cache is switched off while
compiled: it is never read in training, and its per-layer state would give each layer a graph of
its own (and past torch's recompile limit, the rest of the layers would silently run eager).
On the CPU the gain comes from fusing the bf16 casts and element-wise ops around the matrix
products, so it pays with ``bf16`` (docs/performance.md); fused kernels round differently, so a compiled stage is
fingerprinted apart from an eager one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from booster.errors import UserError

#: graphs one compiled layer may have before torch runs it eager.
RECOMPILE_LIMIT = 64


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a (peft-wrapped) causal LM: its decoder's ``layers`` list."""
    base = model.get_base_model() if hasattr(type(model), "get_base_model") else model
    get_decoder = getattr(type(base), "get_decoder", None)
    decoder = base.get_decoder() if get_decoder is not None else None
    layers = getattr(decoder, "layers", None)
    if decoder is None or layers is None or len(layers) == 0:
        raise UserError(
            f"compile: {type(base).__name__} has no decoder with a list of layers to compile; "
            "set align.compile and attack.compile to false for this model"
        )
    return list(layers)


@contextmanager
def compiled_layers(model: Any, enabled: bool) -> Iterator[None]:
    """Within the block, ``model``'s decoder layers run compiled (``enabled``) and its KV cache is
    off; both are put back afterwards, so saving and generation see the model as it was."""
    if not enabled:
        yield
        return
    import torch  # heavy: loaded only where it is used

    layers = decoder_layers(model)
    config = model.config
    use_cache = config.use_cache
    config.use_cache = False
    for layer in layers:
        # sizes vary from batch to batch: dynamic shapes, so a new length is not a new graph
        layer.forward = torch.compile(layer.forward, dynamic=True)
    try:
        # a graph per kind of call (input with or without gradient, a batch without padding has no
        # mask, the probe's passes without gradient, ...): more than torch's default limit of 8,
        # past which the layers would silently run eager
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            yield
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute: the class's forward again
        config.use_cache = use_cache
