"""Pruning masks: which weights a post-fine-tuning repair zeroes, stored apart from the model.

A repair (Antidote, :mod:`booster.methods.antidote`) marks weights of the merged fine-tuned model's
linear layers; the marks are kept as one bit per weight (safetensors, ``numpy.packbits``: 1/16 of
the layers' bfloat16 size, nothing for the layers it leaves alone), and
:func:`booster.models.load_trained` zeroes them whenever it rebuilds the repaired model. So the
repaired model is never stored as a second full copy, and it is exactly the fine-tuned model with
those weights set to zero.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from booster.errors import UserError

#: the mask file a repair stage writes into its folder.
MASK_FILE = "mask.safetensors"


def mask_bytes(masks: dict[str, torch.Tensor]) -> bytes:
    """The safetensors file of boolean ``masks`` (module name -> mask of its weight's shape)."""
    tensors, shapes = {}, {}
    for name, mask in masks.items():
        bits = np.packbits(mask.detach().to("cpu", torch.bool).numpy().reshape(-1))
        tensors[name] = torch.from_numpy(bits)
        shapes[name] = json.dumps(list(mask.shape))
    return save(tensors, metadata=shapes)


def read_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """The boolean masks of a mask file, by module name."""
    masks = {}
    with safe_open(str(path), "pt") as fh:
        shapes = fh.metadata() or {}
        for name in fh.keys():  # noqa: SIM118 -- safe_open is not a mapping
            shape = json.loads(shapes[name])
            bits = np.unpackbits(fh.get_tensor(name).numpy(), count=int(np.prod(shape)))
            masks[name] = torch.from_numpy(bits.astype(bool)).reshape(shape)
    return masks


def apply_masks(model: Any, masks: dict[str, torch.Tensor]) -> int:
    """Zero the masked weights of ``model`` (a merged model: module names as in the mask file);
    returns how many weights were zeroed."""
    modules = dict(model.named_modules())
    zeroed = 0
    with torch.no_grad():
        for name, mask in masks.items():
            module = modules.get(name)
            if module is None or tuple(module.weight.shape) != tuple(mask.shape):
                raise UserError(
                    f"pruning mask for {name!r} does not fit the model (no such layer or another shape); "
                    "the repair stage was written for another model: move its folder aside and run again"
                )
            module.weight[mask.to(module.weight.device)] = 0
            zeroed += int(mask.sum())
    return zeroed
