"""Where the time of a training step and of an evaluation goes, at the study's settings, on this machine.

Three workloads on the embedded SmolLM2-135M with the study's LoRA (r=32 on q/k/v), real embedded
data, the project's loss (logits only at scored positions), AdamW:

- ``align``: a step at batch 8 x max_length 96 on the refusal data (an SFT step; a Booster step
  is this plus two forward/backward passes on the harmful batch, see ``make bench``);
- ``attack``: a step at batch 8 x max_length 128 on the math task, and one harmful-loss probe;
- ``generate``: greedy answers to held-out harmful prompts, 64 new tokens, batch 50.

Each training step runs in a plain loop whose phases are marked (collate, decoder forward, vocabulary
projection + loss, backward, optimizer), under ``torch.profiler``; the ops' own CPU time is then
grouped into kinds (matmul, attention, loss, optimizer, elementwise/norm, indexing, copies). Padding
is measured on the real batches. Writes benchmarks/profile.json and prints a table; nothing here is
a timed test. Run on an idle machine: ``python benchmarks/profile_steps.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

HERE = Path(__file__).resolve().parent
PHASES = ("collate", "forward: decoder", "forward: vocabulary projection + loss", "backward", "optimizer")
#: op-name fragments -> kind, first match wins (aten op names, lower case).
KINDS = [
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "_softmax_backward", "aten::softmax")),
    ("loss", ("log_softmax", "nll_loss", "cross_entropy")),
    ("optimizer", ("_foreach", "adam")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("indexing", ("embedding", "index", "gather", "scatter", "masked", "nonzero", "where")),
    ("copies", ("copy_", "aten::to", "clone", "contiguous", "empty", "zeros", "fill_", "cat", "stack", "_to_copy")),
    ("elementwise/norm", ("mul", "add", "rsqrt", "pow", "mean", "silu", "sigmoid", "div", "neg", "sub", "exp", "cos", "sin", "sum", "sqrt")),
]  # fmt: skip


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, fragments in KINDS:
        if any(f in low for f in fragments):
            return kind
    return "other"


def load_model():
    from booster.config import ModelConfig
    from booster.models import LoraSettings, add_lora, load_model_and_tokenizer

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name="embedded"))
    model = add_lora(model, LoraSettings(r=32, alpha=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    return model, tokenizer


def batches(examples, tokenizer, max_length: int, batch: int, n: int, seed: int = 0):
    """``n`` random batches of tokenised rows (not yet collated), as the Trainer's sampler draws them."""
    from booster.data.template import tokenize_examples

    rows = tokenize_examples(examples, tokenizer, max_length=max_length)
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    return [[rows[i] for i in order[k * batch : (k + 1) * batch]] for k in range(n)]


def padding_share(groups, collator) -> float:
    """Share of the collated batch's positions that are padding."""
    pad = total = 0
    for group in groups:
        mask = collator(group)["attention_mask"]
        pad += int(mask.numel() - mask.sum())
        total += mask.numel()
    return pad / total


def train_steps(model, tokenizer, groups, warmup: int, bf16: bool = False) -> dict:
    """Profile plain optimizer steps over ``groups`` (the first ``warmup`` untimed)."""
    from booster.methods.losses import _decoder_and_head
    from booster.training import default_collator

    collator = default_collator(tokenizer)
    decoder, head = _decoder_and_head(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.1)

    def step(group) -> None:
        with record_function("collate"):
            batch = collator(group)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        with record_function("forward: decoder"), autocast:
            hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            hidden = hidden.last_hidden_state[:, :-1]
        with record_function("forward: vocabulary projection + loss"), autocast:
            targets = batch["labels"][:, 1:]
            scored = targets.ne(-100)
            logits = head(hidden[scored]).float()
            loss = F.cross_entropy(logits, targets[scored], reduction="sum") / scored.sum()
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for group in groups[:warmup]:
        step(group)
    times = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for group in groups[warmup:]:
            start = time.perf_counter()
            step(group)
            times.append(time.perf_counter() - start)
    return summarise(prof, times, len(groups) - warmup, padding_share(groups, collator))


def summarise(prof, times: list[float], steps: int, padding: float | None) -> dict:
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1e6 / steps for e in events if e.key in PHASES}
    kinds: dict[str, float] = defaultdict(float)
    for e in events:
        if e.key in PHASES or not e.key.startswith("aten::"):
            continue
        kinds[kind_of(e.key)] += e.self_cpu_time_total / 1e6 / steps
    return {
        "seconds_per_step": round(statistics.median(times), 3),
        "phases_seconds": {k: round(phases.get(k, 0.0), 3) for k in PHASES},
        "op_kinds_seconds": dict(sorted(((k, round(v, 3)) for k, v in kinds.items()), key=lambda kv: -kv[1])),
        "padding_share": None if padding is None else round(padding, 3),
    }


def probe_seconds(model, tokenizer, max_length: int) -> dict:
    from booster.data.sources import load_probe
    from booster.data.template import tokenize_examples
    from booster.evaluation.probe import harmful_loss
    from booster.training import default_collator

    rows = tokenize_examples(load_probe("embedded"), tokenizer, max_length=max_length)
    collate = default_collator(tokenizer)
    groups = [collate(rows[i : i + 8]) for i in range(0, len(rows), 8)]
    start = time.perf_counter()
    harmful_loss(model, groups, contextlib.nullcontext)
    loss_only = time.perf_counter() - start
    start = time.perf_counter()
    harmful_loss(model, groups, contextlib.nullcontext, with_grad=True)
    return {
        "probe_pairs": len(rows),
        "probe_seconds": round(loss_only, 2),
        "probe_with_gradient_seconds": round(time.perf_counter() - start, 2),
    }


def generation(model, tokenizer, prompts: int, batch: int, new_tokens: int) -> dict:
    from booster.data.sources import load_harmful_prompts
    from booster.data.template import format_prompt
    from booster.evaluation.generation import generate_ids

    texts = [format_prompt(p.instruction, p.input) for p in load_harmful_prompts("embedded", limit=prompts)]
    model.eval()
    out = {}
    with torch.inference_mode():
        for label, tokens in (("prefill (1 new token)", 1), (f"{new_tokens} new tokens", new_tokens)):
            start = time.perf_counter()
            ids = generate_ids(
                model, tokenizer, texts, max_new_tokens=tokens, batch_size=batch, progress=False
            )
            out[label] = {
                "seconds": round(time.perf_counter() - start, 2),
                "new_tokens": sum(len(i) for i in ids),
            }
    model.train()
    full = out[f"{new_tokens} new tokens"]
    prefill = out["prefill (1 new token)"]["seconds"]
    decode_steps = new_tokens - 1
    return {
        "prompts": len(texts),
        "batch_size": batch,
        **out,
        "decode_seconds_per_step": round(
            (full["seconds"] - prefill) / decode_steps / -(-len(texts) // batch), 3
        ),
        "seconds_per_300_prompts": round(full["seconds"] * 300 / len(texts), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--bf16", action="store_true", help="training steps under bf16 autocast")
    parser.add_argument(
        "--bf16-weights", action="store_true", help="frozen weights stored in bf16 (LoRA fp32)"
    )
    parser.add_argument("--only", choices=["align", "attack", "generate"], help="one workload")
    parser.add_argument("--out", default=str(HERE / "profile.json"))
    args = parser.parse_args()

    from booster.data.sources import load_alignment, load_task

    model, tokenizer = load_model()
    if args.bf16_weights:
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    n = args.warmup + args.steps
    result = {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    result["bf16_autocast"] = args.bf16
    if args.only in (None, "align"):
        align_groups = batches(load_alignment("embedded"), tokenizer, 96, 8, n)
        result["align (batch 8 x 96, refusals)"] = train_steps(
            model, tokenizer, align_groups, args.warmup, args.bf16
        )
    if args.only in (None, "attack"):
        attack_groups = batches(load_task("embedded:math", "train", limit=200), tokenizer, 128, 8, n)
        result["attack (batch 8 x 128, math)"] = {
            **train_steps(model, tokenizer, attack_groups, args.warmup, args.bf16),
            **probe_seconds(model, tokenizer, 128),
        }
    if args.only in (None, "generate"):
        result["generate (64 new tokens)"] = generation(model, tokenizer, args.prompts, 50, 64)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
