"""Batched greedy generation for evaluation (HS answers and task answers).

Prompts are sorted by length so that a batch holds prompts of similar length (little padding),
padded on the LEFT so that every prompt ends where generation starts, and decoded with the KV
cache; a batch stops as soon as every answer in it has ended. Greedy decoding makes the answers
deterministic: batching must not change them, which the tests check against one-at-a-time
generation and against batches in input order.

A row whose answer has ended leaves the batch: its KV cache rows are dropped and the next steps
compute only the rows still answering (:func:`_decode_dropping_finished`). transformers' ``generate``
keeps decoding finished rows to the batch's longest answer; most evaluation answers end well before
the token limit, so this halves much of the decoding. The tokens are exactly ``generate``'s greedy
ones (tested against it); models whose cache is not the plain dynamic one (sliding windows, linear
attention) use ``generate``. transformers' static KV cache is not used: without a compiled model it
measured slower on CPU than the dynamic one (docs/performance.md). That is also what lets
``batch_size="auto"`` halve the batch after an out-of-memory error and carry on, and several
processes each answer a share of the prompts (:func:`generate_sharded`) with the answers one process
would give.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator, Sequence
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


@contextlib.contextmanager
def _contiguous_head_input(model: Any) -> Iterator[None]:
    """Hand the output projection a contiguous input while generating in a 16-bit dtype.

    transformers computes the prompts' logits at the last position only, from a strided view of the
    hidden states; torch's CPU linear of a frozen bfloat16 weight and such a view materialises the
    weight once per row (50 prompts x the 49152 x 576 head of SmolLM2: 2.4 GB at once). A contiguous
    copy of the view (a few kB) gives bit-identical logits without it. Float32 is left as it is: there
    the two paths round differently, and float32 never took the costly one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None or weight.dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _plain_dynamic_cache(model: Any) -> bool:
    """Whether finished rows can leave the batch: the model's KV cache is transformers' plain dynamic
    one in every layer (no sliding window, no linear-attention state, whose rows or masks this
    decoding would have to handle as ``generate`` does) and its forward takes position ids."""
    from transformers.cache_utils import (  # heavy: loaded only where it is used
        DynamicCache,
        DynamicLayer,
    )

    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model
    if "position_ids" not in inspect.signature(base.forward).parameters:  # e.g. ALiBi models
        return False
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # a config transformers cannot build a cache for: generate knows the model
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _decode_dropping_finished(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, stop: list[int]
) -> list[list[int]]:
    """Greedy new tokens of a left-padded batch, each row's up to and including its first stop
    token (or ``max_new_tokens`` of them). Rows that have stopped are selected out of the KV cache,
    the attention mask and the next step's input, so each step computes only the rows still
    answering. Positions count from each row's first real token, as ``generate`` counts them."""
    from transformers.cache_utils import DynamicCache  # heavy: loaded only where it is used

    cache = DynamicCache(config=model.config)
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    stop_ids = torch.tensor(stop, device=input_ids.device)
    rows = torch.arange(len(input_ids), device=input_ids.device)
    answers: list[list[int]] = [[] for _ in range(len(input_ids))]
    for step in range(max_new_tokens):
        token = logits.argmax(-1)  # float32's argmax too: the cast keeps order and ties
        for row, t in zip(rows.tolist(), token.tolist(), strict=True):
            answers[row].append(t)
        ended = torch.isin(token, stop_ids)
        if step == max_new_tokens - 1 or bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            attention_mask, token, rows = attention_mask[keep], token[keep], rows[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=-1)
        logits = model(
            input_ids=token[:, None],
            attention_mask=attention_mask,
            position_ids=attention_mask.sum(-1, keepdim=True) - 1,
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
    return answers


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
    drop_finished: bool = True,
) -> list[list[int]]:
    """Greedy new-token ids for each prompt, in the input order, cut before the first stop token
    (eos, the model's own, and ``eos_token_id``: e.g. a chat template's end-of-turn). ``desc``
    names the progress bar (e.g. ``evaluate booster seed 0: harmful prompts``).
    ``sort_by_length=False`` batches the prompts in input order (more padding, the same answers).
    ``drop_finished=False`` decodes with transformers' ``generate`` (finished rows stay in the batch;
    the same answers, slower).

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
    dropping = drop_finished and _plain_dynamic_cache(model)
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
        if dropping:
            answers = _decode_dropping_finished(
                model, input_ids.to(device), attention_mask.to(device), max_new_tokens, stop
            )
        else:
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )
            answers = output[:, width:].tolist()
        for row, i in enumerate(batch):
            new = answers[row]
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
            _contiguous_head_input(model),
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
