"""Seconds to judge 300 answers of 64 tokens, for each judge named (default: embedded-lm and embedded).

The answers are held-out PyRIT responses cut to their first 64 tokens of the embedded model's
tokenizer (the science study's ``max_new_tokens``), each with its own prompt. A judge that is not
fitted yet is fitted first (once; its fit time is in the output as ``fit_seconds``). Writes
benchmarks/judge.json; answers are not printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", action="append", help="judge name (repeat); default embedded-lm, embedded")
    parser.add_argument("--answers", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default=str(HERE / "judge.json"))
    args = parser.parse_args()

    from booster.evaluation.judges import get_judge
    from booster.evaluation.validate import labelled_rows
    from booster.models import ModelConfig, load_model_and_tokenizer

    _, tokenizer = load_model_and_tokenizer(ModelConfig(name="embedded"))
    prompts, answers = [], []
    rows = [r for r in labelled_rows("test") if r.kind == "harm"]
    long_enough = [r for r in rows if len(tokenizer(r.response)["input_ids"]) >= args.tokens]
    for i in range(args.answers):
        row = long_enough[i % len(long_enough)]
        prompts.append(row.objective)
        answers.append(tokenizer.decode(tokenizer(row.response)["input_ids"][: args.tokens]))

    results = []
    for name in args.judge or ["embedded-lm", "embedded"]:
        started = time.perf_counter()
        judge = get_judge(name)
        built = time.perf_counter() - started
        judge.judge(prompts[:8], answers[:8])  # warm-up
        started = time.perf_counter()
        judge.judge(prompts, answers)
        seconds = time.perf_counter() - started
        info = getattr(judge, "info", {})
        results.append(
            {
                "judge": name,
                "answers": args.answers,
                "answer_tokens": args.tokens,
                "judge_seconds": round(seconds, 1),
                "answers_per_second": round(args.answers / seconds, 1),
                "build_seconds": round(built, 1),
                "fit_seconds": info.get("train_seconds"),
                "dtype": str(getattr(getattr(judge, "states", None), "dtype", "float32")),
            }
        )
        print(json.dumps(results[-1]))
        del judge
    machine = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    Path(args.out).write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
