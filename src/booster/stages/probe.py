"""The harmful-loss probe of an aligned model, before any attack.

The attack logs the probe from its step 0 on (:mod:`booster.evaluation.probe`), but only where an
attack runs, and a double-LoRA attack measures the gradient on its fresh adapter. This measures
every aligned model itself: the mean loss of the held-out probe pairs (``attack.probe_data``,
``attack.probe_samples``: the pairs the attack's probe uses) and the norm of its gradient over the
aligned model's trainable weights (its LoRA adapter, or all weights without LoRA): how high the
alignment left the harmful loss and how steep it is there. One forward and backward pass over the
pairs; no generation, no judge.

It writes ``probe-<hash>.json`` into the aligned stage's folder (the hash: the probe's settings), is
reused while that file reads, and one process writes it (a lock per file).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch

from booster.config import RunConfig
from booster.data.sources import load_probe
from booster.data.template import tokenize_examples
from booster.errors import UserError
from booster.evaluation.probe import harmful_loss
from booster.models import evaluation_device, free_device_memory, load_trained
from booster.stages.align import fingerprint, with_data_versions
from booster.storage import (
    claimed,
    from_main,
    is_main_process,
    read_done,
    read_json,
    wait_for_everyone,
    write_json_atomic,
)
from booster.training import default_collator

#: what a probe file holds, copied into the aligned model's results.json entry.
KEYS = ("probe_loss", "probe_grad_norm")


def probe_settings(config: RunConfig) -> dict[str, Any] | None:
    """What the aligned probe measures with; None when it is off (``evaluate.probe_aligned`` false
    or no ``attack.probe_data``)."""
    attack = config.attack
    if not config.evaluate.probe_aligned or not attack.probe_data:
        return None
    settings = {
        "probe_data": attack.probe_data,
        "probe_samples": attack.probe_samples,
        "max_length": attack.max_length,
        "template": config.model.template,
        "bf16": attack.bf16,
    }
    return with_data_versions(settings, attack.probe_data)


def probe_file(config: RunConfig, stage: Path) -> Path | None:
    settings = probe_settings(config)
    return None if settings is None else stage / f"probe-{fingerprint(settings)}.json"


def read_probe(config: RunConfig, stage: Path) -> dict[str, Any] | None:
    """The stored probe values of an aligned stage (None: off, not measured yet, or unreadable)."""
    path = probe_file(config, stage)
    found = read_json(path) if path is not None else None
    if not isinstance(found, dict) or not all(isinstance(found.get(k), int | float) for k in KEYS):
        return None
    return {k: found[k] for k in KEYS}


def run_probe(config: RunConfig, stage: Path, root: Path, wait: bool = True) -> dict[str, Any] | None:
    """Measure (or reuse) the probe of the aligned model in ``stage``; None when the probe is off.

    ``wait=False``: raise :class:`booster.storage.StageBusy` when another process is measuring it.
    """
    path = probe_file(config, stage)
    if path is None:
        return None
    with claimed(stage / f".{path.stem}.lock", path, wait):
        found = from_main(read_probe(config, stage) if is_main_process() else None)
        if found is not None:
            return found
        if is_main_process():
            write_json_atomic(path, measure(config, stage, root))
        wait_for_everyone()
    return read_probe(config, stage)


def measure(config: RunConfig, stage: Path, root: Path) -> dict[str, Any]:
    """Load the aligned model as the attack would train it and take the probe's loss and gradient norm."""
    done = read_done(stage)
    if done is None:
        raise UserError(f"{stage}: the stage is not finished; run `booster run` to finish it")
    started = time.time()
    cfg = config.attack
    # main process only (the others wait in run_probe): the model's files are already local
    model, tokenizer = load_trained(config.model, done["recipe"], root, seed=done["seed"], trainable=True)
    device = evaluation_device()
    model.to(device)
    pairs = load_probe(cfg.probe_data, limit=cfg.probe_samples, seed=0)  # the attack's probe pairs
    dataset = tokenize_examples(pairs, tokenizer, cfg.max_length, config.model.template)
    collate = default_collator(tokenizer)
    batches = [
        {k: v.to(device) for k, v in collate(list(dataset[i : i + cfg.batch_size])).items()}
        for i in range(0, len(dataset), cfg.batch_size)
    ]

    def context() -> Any:  # the precision the attack's own probe runs in
        if cfg.bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    loss, norm = harmful_loss(model, batches, context, with_grad=True)
    del model
    free_device_memory()
    return {
        "probe_loss": round(loss, 6),
        "probe_grad_norm": round(norm, 6) if norm is not None else None,
        "probe_samples": len(dataset),
        "probe_seconds": round(time.time() - started, 2),
    }
