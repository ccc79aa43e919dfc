"""New vs old settings at the study's settings, in one run: SFT and Booster steps, Booster against its
three-pass floor, generation, peak memory.

``old`` is how the study ran (fp32, random batches, generation in fp32 in batches of 50 with
transformers' ``generate``); ``new`` is the speed settings (``align.bf16`` + ``align.group_by_length``,
with the frozen weights stored in bfloat16 as a bf16 stage stores them (:mod:`booster.precision`),
``evaluate.bf16``, the thread settings of :mod:`booster.threads`); ``compiled`` is ``new`` with the
decoder layers compiled (``align.compile``; its first step compiles, so only the later steps are
averaged). Generation also runs as ``fp32``:
today's default decoding (finished rows leave the batch) in float32, whose answers must be the old
ones. Every workload runs in its own process (its own peak memory,
no warm caches shared), on the embedded SmolLM2-135M with the study's LoRA (r=32 on q/k/v), the
study's alignment settings (configs/science/study.yaml: batch 8 x max_length 96, real refusal
and harmful data) and the trainers the align stage builds.

A step's time depends on its batch's length, and length-grouped batches differ more in length than
random ones, so the step figures are means over the timed steps (after warm-up), and each run also
reports the share of padding over a whole epoch of its batch order (exact, no timing). The floor of
a Booster step is an SFT step (same setting) plus Booster's two harmful passes timed inside the
Booster step. Run alone on an idle machine (two torch jobs on 2 cores slow each other far more than
twofold): ``make bench`` or ``python benchmarks/speed.py [--short]``. Writes benchmarks/speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STUDY = ROOT / "configs" / "science" / "study.yaml"
#: the study's evaluation batch (configs/science/study.yaml), used by every generation setting.
GENERATION_BATCH = 50
#: generation settings: (bfloat16, finished rows leave the batch)
GENERATION_SETTINGS = {"old": (False, False), "fp32": (False, True), "new": (True, True)}
#: training-step settings: (the speed settings, the decoder layers compiled: ``align.compile``)
STEP_SETTINGS = {"old": (False, False), "new": (True, False), "compiled": (True, True)}


def study_config(new: bool, steps: int, compiled: bool = False):
    """The study's config (first values of its sweep), with the speed settings when ``new`` (and the
    decoder layers compiled when ``compiled``)."""
    from booster.config import load_sweep

    config = load_sweep(STUDY).base
    config.align.max_steps = steps
    config.align.save_steps = 0
    config.align.logging_steps = 10**6
    config.align.bf16 = new
    config.align.group_by_length = new
    config.evaluate.bf16 = new
    config.align.compile = compiled
    return config


def padding_share(order: list[int], lengths: list[int], batch: int) -> float:
    pad = total = 0
    for k in range(0, len(order), batch):
        rows = [lengths[i] for i in order[k : k + batch]]
        pad += max(rows) * len(rows) - sum(rows)
        total += max(rows) * len(rows)
    return pad / total


def step_child(method: str, setting: str, warmup: int, steps: int) -> dict:
    """Seconds per optimizer step (mean of ``steps`` after ``warmup``) and the process's peak memory,
    under a STEP_SETTINGS entry; the first step's time (a compiled run compiles in it) too."""
    import torch
    from step_time import PeakRss
    from torch._dynamo.utils import counters
    from transformers import TrainerCallback, set_seed

    from booster.data.sources import load_alignment, load_harmful
    from booster.data.template import tokenize_examples
    from booster.methods.registry import get_method
    from booster.models import add_lora, load_model_and_tokenizer
    from booster.passthrough import training_kwargs
    from booster.stages.common import train_stage
    from booster.threads import configure_threads

    new, compiled = STEP_SETTINGS[setting]
    if new:
        configure_threads()
    config = study_config(new, warmup + steps, compiled)
    cfg = config.align
    set_seed(0)
    model, tokenizer = load_model_and_tokenizer(config.model, seed=0)
    model = add_lora(model, config.model.lora)
    template = config.model.template
    train = tokenize_examples(
        load_alignment(cfg.alignment_data, limit=cfg.alignment_samples), tokenizer, cfg.max_length, template
    )
    harmful = tokenize_examples(
        load_harmful(cfg.harmful_data, limit=cfg.harmful_samples), tokenizer, cfg.max_length, template
    )
    spec = get_method(method)
    out = tempfile.mkdtemp(prefix="booster-speed-")
    kwargs = training_kwargs(cfg, out, 0, progress=False)
    trainer = spec.build_align_trainer(
        model, tokenizer, kwargs, train, harmful if spec.uses_harmful_data else None, cfg
    )
    times: list[float] = []

    compiling: list[bool] = []  # whether a step compiled a graph (a compiled run's first step, a new mask)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.graphs = counters["stats"]["unique_graphs"]
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.start)
            compiling.append(counters["stats"]["unique_graphs"] > self.graphs)

    trainer.add_callback(Clock())
    passes: list[float] = []
    if method == "booster":
        terms = trainer.booster_terms

        def timed_terms(*args, **kw):
            start = time.perf_counter()
            result = terms(*args, **kw)
            passes.append(time.perf_counter() - start)
            return result

        trainer.booster_terms = timed_terms
    order = list(trainer._get_train_sampler())
    lengths = [len(row["input_ids"]) for row in train]
    with PeakRss() as rss:
        train_stage(trainer, None, compiled)  # as a stage trains (compiled layers, bf16 weights)
    timed = [
        t for t, compiled_now in zip(times[warmup:], compiling[warmup:], strict=True) if not compiled_now
    ]
    if not timed:
        raise SystemExit(
            f"{method} {setting}: every timed step compiled a graph ({sum(compiling)} of {len(times)}); "
            "time more steps (--steps) or warm up longer (--warmup)"
        )
    return {
        "method": method,
        "setting": setting,
        # steps that compiled a graph are a one-off cost, counted apart
        "seconds_per_step": statistics.mean(timed),
        "first_step_seconds": times[0],
        "compiling_steps": sum(compiling),
        "compiling_seconds": sum(t for t, compiled_now in zip(times, compiling, strict=True) if compiled_now),
        "seconds_per_step_all": [round(t, 3) for t in times],
        "harmful_passes_seconds": statistics.mean(passes[warmup:]) if passes else None,
        "epoch_padding_share": round(padding_share(order, lengths, cfg.batch_size), 4),
        "peak_memory_bytes": int(rss.peak),
        "threads": [torch.get_num_threads(), torch.get_num_interop_threads()],
    }


def generate_child(setting: str, prompts: int, tokens: int, batch: int, adapter: str = "") -> dict:
    """Seconds to answer ``prompts`` held-out harmful prompts with ``tokens`` new tokens each, as the
    evaluate stage does (base + LoRA adapter: a fresh one, which answers as the base model, or a
    trained ``adapter`` folder), under a GENERATION_SETTINGS entry, in batches of ``batch`` (``old``:
    always the study's GENERATION_BATCH)."""
    import torch
    from step_time import PeakRss

    from booster.data.sources import load_harmful_prompts
    from booster.data.template import format_prompts
    from booster.evaluation.generation import generate_ids
    from booster.models import add_lora, load_adapter, load_model_and_tokenizer
    from booster.threads import configure_threads

    bf16, drop_finished = GENERATION_SETTINGS[setting]
    batch = GENERATION_BATCH if setting == "old" else batch
    if setting != "old":
        configure_threads()
    config = study_config(bf16, 1)
    model, tokenizer = load_model_and_tokenizer(config.model, seed=0)
    model = load_adapter(model, adapter, trainable=False) if adapter else add_lora(model, config.model.lora)
    if config.evaluate.bf16:
        model.to(torch.bfloat16)  # as booster.models.load_for_evaluation does under evaluate.bf16
    model.eval()
    texts = format_prompts(load_harmful_prompts("embedded", limit=prompts, seed=0), tokenizer, "alpaca")
    with PeakRss() as rss:
        start = time.perf_counter()
        ids = generate_ids(
            model,
            tokenizer,
            texts,
            max_new_tokens=tokens,
            batch_size=batch,
            progress=False,
            drop_finished=drop_finished,
        )
        seconds = time.perf_counter() - start
    return {
        "setting": setting,
        "bf16": bf16,
        "drop_finished": drop_finished,
        "prompts": len(texts),
        "max_new_tokens": tokens,
        "batch_size": batch,
        "seconds": seconds,
        "new_tokens": sum(len(i) for i in ids),
        "peak_memory_bytes": int(rss.peak),
        "answers": ids,
    }


def child(args: list[str]) -> dict:
    """Run one workload in a fresh process; its JSON result."""
    cmd = [sys.executable, __file__, "--child", *args]
    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"benchmark {' '.join(args)} failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_steps(args: argparse.Namespace, summary: dict) -> dict:
    """SFT and Booster steps under each STEP_SETTINGS entry, each in its own process; ratios over
    ``old`` into ``summary``."""
    steps: dict[str, dict[str, dict]] = {}
    for method in ("sft", "booster"):
        for setting in STEP_SETTINGS:
            run = child(["step", method, setting, str(args.warmup), str(args.steps)])
            steps.setdefault(method, {})[setting] = run
            print(
                f"{method:>7} {setting}: {run['seconds_per_step']:.3f} s/step ({run['compiling_steps']} "
                f"steps compiling: {run['compiling_seconds']:.0f} s), padding {run['epoch_padding_share']:.1%}, "
                f"peak {run['peak_memory_bytes'] / 2**20:.0f} MiB",
                flush=True,
            )

    def ratio(method: str, setting: str) -> float:
        return steps[method]["old"]["seconds_per_step"] / steps[method][setting]["seconds_per_step"]

    floors = {
        setting: steps["booster"][setting]["seconds_per_step"]
        / (steps["sft"][setting]["seconds_per_step"] + steps["booster"][setting]["harmful_passes_seconds"])
        for setting in STEP_SETTINGS
    }
    peaks = {
        f"{method}{suffix}": steps[method][setting]["peak_memory_bytes"]
        / steps[method]["old"]["peak_memory_bytes"]
        for method in steps
        for setting, suffix in (("new", ""), ("compiled", "_compiled"))
    }
    summary.update(
        sft_step_speedup=ratio("sft", "new"),
        booster_step_speedup=ratio("booster", "new"),
        sft_step_speedup_compiled=ratio("sft", "compiled"),
        booster_step_speedup_compiled=ratio("booster", "compiled"),
        **{f"booster_over_three_pass_floor_{setting}": floor for setting, floor in floors.items()},
    )
    summary.setdefault("peak_memory_new_over_old", {}).update(peaks)
    for name, key in (("SFT", "sft"), ("Booster", "booster")):
        print(
            f"  {name + ' step':<13} {summary[f'{key}_step_speedup']:.2f}x, compiled "
            f"{summary[f'{key}_step_speedup_compiled']:.2f}x   (goal >= 1.7x)"
        )
    print(
        "  Booster / three-pass floor: "
        + ", ".join(f"{setting} {floor:.2f}x" for setting, floor in floors.items())
        + "   (goal <= 1.10x)"
    )
    print(
        f"  peak memory over old: SFT {peaks['sft']:.2f}x (compiled {peaks['sft_compiled']:.2f}x), Booster "
        f"{peaks['booster']:.2f}x (compiled {peaks['booster_compiled']:.2f}x)   (goal <= 1.0x)"
    )
    return steps


def time_generation(args: argparse.Namespace, summary: dict) -> dict:
    """Generation under each GENERATION_SETTINGS entry, each in its own process; ratios into ``summary``."""
    generation = {}
    extra = [args.adapter] if args.adapter else []
    for setting in GENERATION_SETTINGS:
        run = generation[setting] = child(
            ["generate", setting, str(args.prompts), str(args.new_tokens), str(args.batch), *extra]
        )
        print(
            f"generate {setting}: {run['seconds']:.1f} s for {run['prompts']} prompts x {args.new_tokens} "
            f"tokens ({run['new_tokens']} generated) in batches of {run['batch_size']}, peak {run['peak_memory_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
    answers = {setting: run.pop("answers") for setting, run in generation.items()}

    def identical(setting: str) -> int:
        return sum(a == b for a, b in zip(answers["old"], answers[setting], strict=True))

    def over_old(setting: str, key: str) -> float:
        return generation[setting][key] / generation["old"][key]

    summary.update(
        generation_speedup=1 / over_old("new", "seconds"),
        generation_identical_answers=identical("new"),
        generation_fp32_speedup=1 / over_old("fp32", "seconds"),
        generation_fp32_identical_answers=identical("fp32"),
    )
    peaks = summary.setdefault("peak_memory_new_over_old", {})
    peaks.update(
        generation=over_old("new", "peak_memory_bytes"), generation_fp32=over_old("fp32", "peak_memory_bytes")
    )
    print(
        f"  generation of {args.prompts} prompts x {args.new_tokens} tokens {summary['generation_speedup']:.2f}x   "
        f"(goal >= 2x; {summary['generation_identical_answers']}/{args.prompts} answers identical to fp32's)"
    )
    print(
        f"  generation in fp32, finished rows leaving the batch {summary['generation_fp32_speedup']:.2f}x   "
        f"({summary['generation_fp32_identical_answers']}/{args.prompts} answers identical to the old ones)"
    )
    print(
        f"  peak memory new / old: generation {peaks['generation']:.2f}x "
        f"(fp32 {peaks['generation_fp32']:.2f}x)   (goal <= 1.0x)"
    )
    return generation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--short", action="store_true", help="1 warm-up + 2 timed steps, 20 prompts: a quick check"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run")
    parser.add_argument("--prompts", type=int, default=100, help="held-out harmful prompts to answer")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--batch",
        type=int,
        default=GENERATION_BATCH,
        help="prompts per generation batch of the fp32 and new settings (old: always the study's 50)",
    )
    parser.add_argument(
        "--adapter",
        default="",
        help="a trained LoRA adapter folder (e.g. RUN/align/sft-seed0-*/model) for the generation "
        "runs: an aligned model's answers end sooner than the base model's (default: a fresh adapter)",
    )
    parser.add_argument("--only", choices=["steps", "generation"], help="run one half of the benchmark")
    parser.add_argument("--out", default=str(HERE / "speed.json"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "step":
            result = step_child(rest[0], rest[1], int(rest[2]), int(rest[3]))
        else:
            result = generate_child(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), *rest[4:])
        print(json.dumps(result))
        return
    if args.short:
        args.steps, args.prompts = 2, 20
    started = time.time()
    summary: dict = {}
    print("new settings vs old (speed-up = old seconds / new seconds):", flush=True)
    steps = time_steps(args, summary) if args.only != "generation" else {}
    generation = time_generation(args, summary) if args.only != "steps" else {}
    result = {
        "config": str(STUDY.relative_to(ROOT)),
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "generation_batch": args.batch,
        # the adapter's stage folder and name (not the machine's path)
        "adapter": "/".join(Path(args.adapter).resolve().parts[-2:]) if args.adapter else None,
        "machine": {"cpus": os.cpu_count()},
        "steps": steps,
        "generation": generation,
        "summary": summary,
        "seconds": round(time.time() - started, 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
