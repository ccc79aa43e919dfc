"""Seconds per optimizer step and peak memory of SFT vs Booster alignment, side by side in one run.

Each method runs in its own subprocess (so peak memory is its own), on the same model, batch and
sequence length, with warm-up steps before the timed ones; the figures are medians. Writes
benchmarks/results.json. Run with `make bench` (on a GPU the same script measures CUDA memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def synthetic_batches(tokenizer, n: int, batch: int, length: int, seed: int):
    """Fixed-length batches with the loss on the second half (the response), as alignment data has."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab = min(len(tokenizer), 30000)
    rows = []
    for _ in range(n * batch):
        ids = torch.randint(100, vocab, (length,), generator=gen).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * length})
    return rows


class PeakRss:
    """Samples this process's resident memory every 5 ms (CPU has no allocator peak counter)."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(method: str, model_name: str, batch: int, length: int, warmup: int, steps: int) -> dict:
    """Run in a child process: time `steps` optimizer steps after `warmup` ones."""
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from booster.models import LoraSettings, ModelConfig, add_lora, load_model_and_tokenizer
    from booster.training import BoosterConfig, BoosterTrainer, LMTrainer

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=model_name))
    model = add_lora(model, LoraSettings())
    cuda = torch.cuda.is_available()
    total = warmup + steps
    data = synthetic_batches(tokenizer, total, batch, length, seed=0)
    harmful = synthetic_batches(tokenizer, total, batch, length, seed=1)
    common = dict(
        output_dir="/tmp/booster-bench",
        per_device_train_batch_size=batch,
        max_steps=total,
        learning_rate=5e-4,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=cuda,
    )

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)
            if state.global_step == warmup and cuda:
                torch.cuda.reset_peak_memory_stats()

    if method == "booster":
        trainer = BoosterTrainer(
            model=model,
            args=BoosterConfig(**common),
            train_dataset=data,
            harmful_dataset=harmful,
            processing_class=tokenizer,
        )
    else:
        trainer = LMTrainer(
            model=model, args=TrainingArguments(**common), train_dataset=data, processing_class=tokenizer
        )
    trainer.add_callback(Clock())
    with PeakRss() as rss:
        baseline = rss.proc.memory_info().rss
        trainer.train()
    timed = times[warmup:]
    peak = torch.cuda.max_memory_allocated() if cuda else rss.peak
    return {
        "method": method,
        "seconds_per_step": statistics.median(timed),
        "seconds_per_step_all": [round(t, 4) for t in timed],
        "peak_memory_bytes": int(peak),
        "memory_kind": "cuda_max_allocated" if cuda else "process_peak_rss",
        "rss_before_training_bytes": int(baseline),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "results.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.batch, args.length, args.warmup, args.steps)))
        return
    runs = {}
    for method in ("sft", "booster"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            method,
            "--model",
            args.model,
            "--batch",
            str(args.batch),
            "--length",
            str(args.length),
            "--warmup",
            str(args.warmup),
            "--steps",
            str(args.steps),
        ]
        out = subprocess.run(
            cmd, check=True, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
        )
        runs[method] = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{method}: {runs[method]['seconds_per_step']:.3f} s/step, peak {runs[method]['peak_memory_bytes'] / 2**20:.0f} MiB"
        )
    result = {
        "model": args.model,
        "batch": args.batch,
        "length": args.length,
        "lora": "r=32 on q_proj/k_proj/v_proj",
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "sft": runs["sft"],
        "booster": runs["booster"],
        "booster_over_sft_step_time": runs["booster"]["seconds_per_step"] / runs["sft"]["seconds_per_step"],
        "booster_over_sft_peak_memory": runs["booster"]["peak_memory_bytes"]
        / runs["sft"]["peak_memory_bytes"],
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"booster/sft step time {result['booster_over_sft_step_time']:.2f}x, "
        f"peak memory {result['booster_over_sft_peak_memory']:.2f}x -> {args.out}"
    )


if __name__ == "__main__":
    main()
