"""One evaluation on the evaluation device, timed: where the model and the judge ran, and prompts/s.

The evaluation stage (``run_evaluate``) runs on a stage folder holding a fresh LoRA adapter on the
model, exactly as for a trained one: the model is loaded onto ``booster.models.evaluation_device()``,
answers the harmful prompts, is freed, and the judge scores them. The script records the device and
dtype of the model's parameters at each generation call and of the judge's at judging, prints them
with prompts/s (the harmful prompts over the generation time) and writes them as JSON. With
``--require-cuda`` it fails unless both ran on a CUDA device. Answers are not printed.

    python benchmarks/eval_check.py --model embedded --batch-size auto --require-cuda   # on a GPU
    python benchmarks/eval_check.py --model tiny --judge keyword \
        --harmful-prompts configs/data/tiny/harmful_prompts.jsonl --prompts 8     # anywhere
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _first_parameter(module: Any) -> Any:
    return next(module.parameters(), None) if module is not None else None


def judge_parameter(judge: Any) -> Any:
    """A parameter of the judge's model, if it has one (beaver-dam: ``model``; embedded: its embedder's)."""
    model = getattr(judge, "model", None) or getattr(getattr(judge, "embedder", None), "model", None)
    return _first_parameter(model)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--bf16", action="store_true", help="evaluate as a bf16-trained stage (in bfloat16)")
    parser.add_argument("--judge", default="embedded")
    parser.add_argument("--harmful-prompts", default="embedded")
    parser.add_argument("--prompts", type=int, default=80)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", default="auto", help="an integer or auto")
    parser.add_argument(
        "--require-cuda", action="store_true", help="fail unless the model and judge ran on CUDA"
    )
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args(argv)

    from booster.config import load_config
    from booster.evaluation import generation, judges
    from booster.models import add_lora, evaluation_device, load_model_and_tokenizer, save_model
    from booster.stages.evaluate import run_evaluate
    from booster.storage import write_json_atomic

    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    config = load_config(
        None,
        [
            f"model.name={args.model}",
            f"model.dtype={args.dtype}",
            f"align.bf16={str(args.bf16).lower()}",
            f"evaluate.harmful_prompts={args.harmful_prompts}",
            f"evaluate.harmful_samples={args.prompts}",
            "evaluate.task_samples=0",
            f"evaluate.max_new_tokens={args.max_new_tokens}",
            f"evaluate.batch_size={batch}",
            f"evaluate.judge={args.judge}",
        ],
    )
    seen: dict[str, Any] = {"generation": [], "judge": []}
    generate = generation.generate

    def recording_generate(model: Any, tokenizer: Any, prompts: list[str], **kwargs: Any) -> list[str]:
        p = _first_parameter(model)
        started = time.perf_counter()
        answers = generate(model, tokenizer, prompts, **kwargs)
        seen["generation"].append(
            {
                "device": str(p.device),
                "dtype": str(p.dtype),
                "prompts": len(prompts),
                "seconds": time.perf_counter() - started,
            }
        )
        return answers

    judging_on = judges.judging_on

    def recording_judging_on(judge: Any, device: Any) -> Any:
        class Recorded:
            def __enter__(self) -> Any:
                self.inner = judging_on(judge, device)
                entered = self.inner.__enter__()
                p = judge_parameter(entered)
                seen["judge"].append({"device": str(p.device) if p is not None else "none (no model)"})
                return entered

            def __exit__(self, *exc: Any) -> Any:
                return self.inner.__exit__(*exc)

        return Recorded()

    generation.generate = recording_generate
    judges.judging_on = recording_judging_on
    try:
        with tempfile.TemporaryDirectory(prefix="eval-check-") as tmp:
            root = Path(tmp)
            model, tokenizer = load_model_and_tokenizer(config.model)
            stage = root / "align" / "check"
            save_model(add_lora(model, config.model.lora), tokenizer, stage / "model")
            del model
            write_json_atomic(
                stage / "done.json",
                {"stage": "align", "seed": 0, "recipe": {"merge": [], "adapter": "align/check/model"}},
            )
            started = time.perf_counter()
            metrics, _ = run_evaluate(config, stage, root, None, progress=False)
            wall = time.perf_counter() - started
    finally:
        generation.generate = generate
        judges.judging_on = judging_on

    [gen] = seen["generation"]
    report = {
        "evaluation_device": str(evaluation_device()),
        "model_device": gen["device"],
        "model_dtype": gen["dtype"],
        "judge": args.judge,
        "judge_device": seen["judge"][0]["device"] if seen["judge"] else None,
        "prompts": gen["prompts"],
        "max_new_tokens": args.max_new_tokens,
        "batch_size": batch,
        "generation_seconds": round(gen["seconds"], 3),
        "prompts_per_second": round(gen["prompts"] / gen["seconds"], 3),
        "evaluation_seconds": round(wall, 3),
        "harmful_score": metrics["harmful_score"],
    }
    for key, value in report.items():
        print(f"{key:>20}: {value}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.require_cuda:
        judge_device = report["judge_device"] or ""
        on_gpu = report["model_device"].startswith("cuda") and (
            judge_device.startswith("cuda") or judge_device.startswith("none")
        )
        if not on_gpu:
            print("FAIL: the evaluated model or the judge did not run on the GPU", file=sys.stderr)
            raise SystemExit(1)
        print("OK: the evaluated model and the judge ran on the GPU")
    return report


if __name__ == "__main__":
    main()
