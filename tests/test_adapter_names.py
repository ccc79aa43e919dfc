"""Which modules of a peft LoRA model are the adapter's own matrices."""

from __future__ import annotations

import torch

from booster.adapter_names import lora_target
from tests.test_booster_step import make_model


def test_only_the_adapters_lora_matrices_name_a_target(tiny_tokenizer):
    model = make_model(tiny_tokenizer, lora=True, dtype=torch.float32)
    named = {name: lora_target(name) for name, _ in model.named_modules()}
    adapter = {name: t for name, t in named.items() if t}
    assert adapter and all(".lora_A." in n or ".lora_B." in n for n in adapter)
    assert set(adapter.values()) <= {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert {n.rsplit(".", 3)[-3] for n in adapter} == set(adapter.values())
    # the frozen base linear under each adapted layer, its dropout and the layer itself are not
    others = [
        n for n in named if n.endswith(("base_layer", "lora_dropout.default", "_proj", "lora_A", "lora_B"))
    ]
    assert len(others) > len(adapter)  # base layers, dropouts, the adapted layers and their ModuleDicts
    assert all(named[n] is None for n in others)
    assert lora_target("model.layers.0.self_attn.q_proj.lora_A.default") == "q_proj"
    assert lora_target("lora_A.default") is None and lora_target("q_proj") is None
