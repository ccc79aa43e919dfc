"""Seconds per optimizer step and peak memory of SFT vs Booster alignment, side by side in one run.

Each method runs in its own subprocess (so peak memory is its own), on the same model, batch and
sequence length, with warm-up steps before the timed ones; the figures are medians. Booster's
correction (the two harmful passes) is also timed on its own, which gives the three-pass floor:
an SFT step plus two forward/backward passes. The variant ``full-logits`` swaps in the plain loss
(logits for every position and the whole vocabulary, as Trainer's default and the reference code
compute them) to measure what computing logits only at scored positions saves. Writes
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


def full_logits_loss_sum(model, batch):
    """The plain loss: logits at every position over the whole vocabulary, then the scored ones."""
    import torch.nn.functional as F

    labels = batch["labels"][:, 1:]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, :-1]
    scored = labels.ne(-100)
    return F.cross_entropy(logits.float()[scored], labels[scored], reduction="sum")


def measure(
    method: str, model_name: str, batch: int, length: int, warmup: int, steps: int, variant: str
) -> dict:
    """Run in a child process: time `steps` optimizer steps after `warmup` ones."""
    import torch

    import booster.methods.booster
    import booster.training

    if variant == "full-logits":  # the alignment pass (LMTrainer) and Booster's harmful passes
        booster.training.token_loss_sum = full_logits_loss_sum
        booster.methods.booster.token_loss_sum = full_logits_loss_sum
    from transformers import TrainerCallback, TrainingArguments

    from booster.methods.booster import BoosterConfig, BoosterTrainer
    from booster.models import LoraSettings, ModelConfig, add_lora, load_model_and_tokenizer
    from booster.training import LMTrainer

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
    correction_times: list[float] = []
    if method == "booster":
        terms = trainer.booster_terms

        def timed_terms(*args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = terms(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            correction_times.append(time.perf_counter() - start)
            return out

        trainer.booster_terms = timed_terms
    with PeakRss() as rss:
        baseline = rss.proc.memory_info().rss
        trainer.train()
    timed = times[warmup:]
    peak = torch.cuda.max_memory_allocated() if cuda else rss.peak
    return {
        "method": method,
        "variant": variant,
        "seconds_per_step": statistics.median(timed),
        "correction_seconds": statistics.median(correction_times[warmup:]) if correction_times else None,
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
    parser.add_argument("--variants", default="optimised,full-logits", help="comma-separated; see above")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="optimised", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        figures = measure(
            args.child, args.model, args.batch, args.length, args.warmup, args.steps, args.variant
        )
        print(json.dumps(figures))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    runs: dict[str, dict[str, dict]] = {}
    for variant in variants:
        runs[variant] = {}
        for method in ("sft", "booster"):
            cmd = [sys.executable, __file__, "--child", method, "--variant", variant, "--model", args.model]
            cmd += ["--batch", str(args.batch), "--length", str(args.length)]
            cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
            out = subprocess.run(
                cmd, check=True, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
            )
            run = runs[variant][method] = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{variant:>12} {method:>7}: {run['seconds_per_step']:.3f} s/step, "
                f"peak {run['peak_memory_bytes'] / 2**20:.0f} MiB"
            )
    main_runs = runs[variants[0]]
    sft, booster = main_runs["sft"], main_runs["booster"]
    # The floor: an SFT step plus Booster's two extra forward/backward passes, timed on their own.
    floor = sft["seconds_per_step"] + booster["correction_seconds"]
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
        "variant": variants[0],
        "sft": sft,
        "booster": booster,
        "booster_over_sft_step_time": booster["seconds_per_step"] / sft["seconds_per_step"],
        "booster_over_sft_peak_memory": booster["peak_memory_bytes"] / sft["peak_memory_bytes"],
        "booster_over_three_pass_floor": booster["seconds_per_step"] / floor,
        "variants": {
            variant: {
                "sft_seconds_per_step": r["sft"]["seconds_per_step"],
                "booster_seconds_per_step": r["booster"]["seconds_per_step"],
                "sft_peak_memory_bytes": r["sft"]["peak_memory_bytes"],
                "booster_peak_memory_bytes": r["booster"]["peak_memory_bytes"],
                "booster_over_sft_step_time": r["booster"]["seconds_per_step"] / r["sft"]["seconds_per_step"],
            }
            for variant, r in runs.items()
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"booster/sft step time {result['booster_over_sft_step_time']:.2f}x, "
        f"peak memory {result['booster_over_sft_peak_memory']:.2f}x, "
        f"booster / (sft step + 2 harmful passes) {result['booster_over_three_pass_floor']:.2f}x -> {args.out}"
    )


if __name__ == "__main__":
    main()
