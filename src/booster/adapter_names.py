"""How a peft LoRA model names its modules: which of them are the adapter's own matrices.

One definition, so that what stores the frozen base weights in bf16 (``precision``) and what prunes
the adapter (``methods.antidote``) agree on which linear layers belong to the adapter.
"""

from __future__ import annotations


def lora_target(name: str) -> str | None:
    """The layer a LoRA matrix belongs to (``...q_proj.lora_A.default`` -> ``q_proj``), else None."""
    parts = name.split(".")
    return parts[-3] if len(parts) >= 3 and parts[-2] in ("lora_A", "lora_B") else None
