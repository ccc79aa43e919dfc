"""Batched greedy generation for evaluation (HS answers and task answers).

Prompts are sorted by length so that a batch holds prompts of similar length (little padding),
padded on the LEFT so that every prompt ends where generation starts, and decoded with the KV
cache; a batch stops as soon as every answer in it has ended. Greedy decoding makes the answers
deterministic: batching must not change them, which the tests check against one-at-a-time
generation and against batches in input order. transformers' static KV cache is not used: without
a compiled model it measured slower on CPU than the dynamic one (docs/performance.md). That is also what lets ``batch_size="auto"`` halve the
batch after an out-of-memory error and carry on, and several processes each answer a share of the
prompts (:func:`generate_sharded`) with the answers one process would give.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from booster.data.template import encode_prompt
from booster.evaluation import generation
from booster.models import accelerator_state

#: ``batch_size="auto"`` starts here on an accelerator and halves on out-of-memory; on CPU there is
#: no out-of-memory error to react to (the system kills the process), so it starts at the default.
AUTO_START = 512
AUTO_START_CPU = 16


def _stop_ids(model: Any, tokenizer: Any, extra: int | Sequence[int] | None = None) -> list[int]:
    """Every token that ends an answer: the tokenizer's eos, the model's (chat models have several)
    and ``extra`` (a chat template's end-of-turn)."""
    ids: set[int] = set()
    if extra is not None:
        ids.update([int(extra)] if isinstance(extra, int) else (int(i) for i in extra))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return sorted(ids)


def _encode(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids exactly as training builds the prompt part (template.encode_prompt): bos only if
    the tokenizer adds one and the prompt lacks it, never an eos."""

    return encode_prompt(tokenizer, prompt)


def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int | str = 16,
    progress: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    desc: str = "generating",
    sort_by_length: bool = True,
) -> list[list[int]]:
    """Greedy new-token ids for each prompt, in the input order, cut before the first stop token
    (eos, the model's own, and ``eos_token_id``: e.g. a chat template's end-of-turn). ``desc``
    names the progress bar (e.g. ``evaluate booster seed 0: harmful prompts``).
    ``sort_by_length=False`` batches the prompts in input order (more padding, the same answers).

    ``batch_size="auto"``: the largest that fits, found with accelerate's
    ``find_executable_batch_size``: start at ``AUTO_START`` prompts (at most all of them), halve on an
    out-of-memory error and go on from the first unfinished batch. The first batch holds the longest
    prompts, so an out-of-memory shows there.
    """
    from accelerate.utils import (
        find_executable_batch_size,  # heavy: loaded only where it is used, so light commands stay fast
    )
    from transformers import (
        GenerationConfig,  # heavy: loaded only where it is used, so light commands stay fast
    )

    if not prompts:
        return []
    auto = batch_size == "auto"
    if (not auto and (not isinstance(batch_size, int) or batch_size < 1)) or max_new_tokens < 1:
        raise ValueError("batch_size (an integer or 'auto') and max_new_tokens must be >= 1")
    stop = _stop_ids(model, tokenizer, eos_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=stop,
        pad_token_id=pad_id,
    )
    encoded = [_encode(tokenizer, p) for p in prompts]
    # Longest first: the first batch shows at once whether memory suffices, and the ETA is an upper bound.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]) if sort_by_length else 0)
    device = next(model.parameters()).device
    results: list[list[int]] = [[] for _ in prompts]
    finished = 0  # prompts of ``order`` answered so far: kept when an out-of-memory halves the batch

    def answer_batch(batch: list[int]) -> None:
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: the prompt ends at the last column
            ids = encoded[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
        )
        for row, i in enumerate(batch):
            new = output[row, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stop), len(new))
            results[i] = new[:cut]

    def answer_rest(size: int) -> None:
        nonlocal finished
        while finished < len(order):
            batch = order[finished : finished + size]
            answer_batch(batch)
            finished += len(batch)
            bar.update(len(batch))

    size = (
        batch_size if not auto else min(len(prompts), AUTO_START if device.type != "cpu" else AUTO_START_CPU)
    )

    def halve() -> int:
        nonlocal size
        size //= 2
        return size

    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False) as bar,
        ):
            if auto:
                find_executable_batch_size(
                    answer_rest, starting_batch_size=size, reduce_batch_size_fn=halve
                )()
            else:
                answer_rest(size)
    finally:
        model.train(was_training)
    return results


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int | str = 16,
    progress: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    desc: str = "generating",
) -> list[str]:
    """Greedy answers to already formatted prompts (see data.template.format_prompt), in input order.

    Returns only the new text, without special tokens; each answer ends at its first eos (or
    ``eos_token_id``, see :func:`generate_ids`).
    """
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # for any code path that pads with the tokenizer itself
    try:
        ids = generate_ids(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            eos_token_id=eos_token_id,
            desc=desc,
        )
    finally:
        tokenizer.padding_side = padding_side
    return [tokenizer.decode(seq, skip_special_tokens=True) for seq in ids]


def generate_sharded(model: Any, tokenizer: Any, prompts: list[str], **kwargs: Any) -> list[str]:
    """:func:`generate` split over the processes of ``accelerate launch``: process r answers prompts
    r, r + n, r + 2n, ... (every share has long and short prompts), and every process gets all the
    answers in input order. Greedy decoding does not depend on which prompts share a batch, so the
    answers are those of one process. One process: :func:`generate` itself."""

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return generation.generate(model, tokenizer, prompts, **kwargs)
    from accelerate.utils import (
        gather_object,  # heavy: loaded only where it is used, so light commands stay fast
    )

    state = accelerator_state()
    mine = list(range(state.process_index, len(prompts), state.num_processes))
    kwargs["progress"] = kwargs.get("progress", True) and state.is_main_process
    answers = generation.generate(model, tokenizer, [prompts[i] for i in mine], **kwargs)
    everything: list[str | None] = [None] * len(prompts)
    for i, answer in gather_object(list(zip(mine, answers, strict=True))):
        everything[i] = answer
    assert all(a is not None for a in everything), "a prompt was answered by no process"
    return everything  # type: ignore[return-value]
