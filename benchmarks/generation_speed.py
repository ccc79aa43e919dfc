"""Tokens per second of the reference's generation loop (one prompt at a time) vs the batched evaluator.

Both run greedy decoding on the same embedded held-out harmful prompts with the same model; the
script checks that the answers agree and writes benchmarks/generation.json. Answers are not printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--out", default=str(HERE / "generation.json"))
    args = parser.parse_args()

    from booster.data.sources import load_harmful_prompts
    from booster.data.template import format_prompt
    from booster.evaluation.generation import generate
    from booster.models import ModelConfig, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=args.model))
    model.eval()
    prompts = [
        format_prompt(p.instruction, p.input) for p in load_harmful_prompts("embedded", limit=args.prompts)
    ]

    start = time.perf_counter()
    sequential, new_tokens = [], 0
    with torch.inference_mode():
        for prompt in prompts:  # the reference's loop: one prompt, model.generate, decode
            ids = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
            new = out[0, ids["input_ids"].shape[1] :]
            new_tokens += len(new)
            sequential.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    sequential_s = time.perf_counter() - start

    start = time.perf_counter()
    batched = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=False,
    )
    batched_s = time.perf_counter() - start

    agree = sum(a.strip() == b.strip() for a, b in zip(sequential, batched, strict=True))
    result = {
        "model": args.model,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "new_tokens_sequential": new_tokens,
        "sequential_seconds": round(sequential_s, 2),
        "batched_seconds": round(batched_s, 2),
        "sequential_tokens_per_second": round(new_tokens / sequential_s, 2),
        "batched_tokens_per_second": round(new_tokens / batched_s, 2),
        "batched_over_sequential_generation": round(sequential_s / batched_s, 2),
        "identical_answers": agree,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
