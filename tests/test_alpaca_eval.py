"""AlpacaEval export: answers written for alpaca-eval, FA pending (never a made-up number), and the
Alpaca -> AlpacaEval data routes. Fixture rows are invented placeholders written by the tests."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from booster.cli import main
from booster.config import load_config
from booster.data import hub, sources
from booster.data.records import Example
from booster.data.sources import load_task, resolve, task_name
from booster.errors import UserError
from booster.evaluation import alpaca_eval
from booster.pipeline import result_entry
from booster.stages.evaluate import evaluate_model

EVAL_ROWS = [
    {
        "instruction": f"Write two sentences about fixture topic {i}.",
        "output": f"Reference answer {i}.",
        "generator": "fixture_reference",
        "dataset": f"fixture_{i % 2}",
    }
    for i in range(3)
]
TRAIN_ROWS = [
    {"instruction": f"Do fixture chore {i}.", "input": f"detail {i}" if i % 2 else "", "output": f"Done {i}."}
    for i in range(30)
]
KEYS = {"instruction", "output", "generator", "dataset"}


@pytest.fixture
def eval_file(tmp_path) -> Path:
    path = tmp_path / "copies" / "ae_copy.json"  # no split word in the name: the schema decides
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(EVAL_ROWS), encoding="utf-8")
    return path


@pytest.fixture
def train_file(tmp_path) -> Path:
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(TRAIN_ROWS), encoding="utf-8")
    return path


def _config(*overrides: str):
    return load_config("configs/tiny.yaml", list(overrides))


def _fake_generate(calls: list[int]):
    """Stands in for batched generation in plumbing tests: records max_new_tokens, answers fixed text."""

    def generate(model, tokenizer, prompts, *, max_new_tokens, batch_size=16, progress=True, desc=""):
        calls.append(max_new_tokens)
        return [f" answer {i}\n" for i in range(len(prompts))]

    return generate


# -- data routes -----------------------------------------------------------------------------------


def test_local_alpaca_eval_copy_is_a_whole_test_set(eval_file):
    spec = str(eval_file)
    assert resolve(spec).schema == "alpacaeval" and task_name(spec) == "alpaca"
    test = load_task(spec, "test")
    assert [e.instruction for e in test] == [r["instruction"] for r in EVAL_ROWS]  # every row, in order
    assert test[0].meta["generator"] == "fixture_reference" and test[1].meta["dataset"] == "fixture_1"
    assert load_task(f"alpacaeval:{spec}", "test") == test
    assert [e.instruction for e in load_task(spec, "test", limit=2)] == [
        r["instruction"] for r in EVAL_ROWS[:2]
    ]
    with pytest.raises(UserError, match="evaluation set"):
        load_task(spec, "train")


@pytest.fixture
def fake_hub(monkeypatch):
    """The hub answers from fixtures; the source cache is cleared so no other test sees them."""
    calls: list[tuple[str, str, str | None]] = []

    def read_hub_table(dataset, hub_id, split):
        calls.append((dataset.name, hub_id, split))
        return [dict(r) for r in (EVAL_ROWS if dataset.name == "alpacaeval" else TRAIN_ROWS)]

    monkeypatch.setattr(hub, "read_hub_table", read_hub_table)
    sources._load_cached.cache_clear()
    yield calls
    sources._load_cached.cache_clear()


@pytest.mark.parametrize("spec", ["alpaca", "tatsu-lab/alpaca"])
def test_alpaca_from_the_hub_is_scored_on_alpaca_eval(fake_hub, spec):
    assert task_name(spec) == "alpaca"
    assert len(load_task(spec, "train")) == len(TRAIN_ROWS)
    test = load_task(spec, "test")
    assert [e.instruction for e in test] == [r["instruction"] for r in EVAL_ROWS]
    assert ("alpaca", "tatsu-lab/alpaca", "train") in fake_hub
    assert ("alpacaeval", "tatsu-lab/alpaca_eval", "test") in fake_hub


# -- the export ------------------------------------------------------------------------------------


def test_model_outputs_rows_and_command():
    examples = [
        Example("Say hi.", "hi", meta={"generator": "ref", "dataset": "d"}),
        Example("Say bye.", "bye", meta={"generator": "ref"}),  # no dataset: no key
    ]
    rows = alpaca_eval.model_outputs(examples, [" hello\n", "goodbye"], "m-1")
    assert rows == [
        {"instruction": "Say hi.", "output": "hello", "generator": "m-1", "dataset": "d"},
        {"instruction": "Say bye.", "output": "goodbye", "generator": "m-1"},
    ]
    with pytest.raises(ValueError):
        alpaca_eval.model_outputs(examples, ["one"], "m-1")
    cmd = alpaca_eval.command(Path("runs/a b/alpaca_eval-x.json"))
    assert shlex.split(cmd) == [
        "alpaca_eval",
        "--model_outputs",
        "runs/a b/alpaca_eval-x.json",
        "--annotators_config",
        "weighted_alpaca_eval_gpt4_turbo",
    ]


def test_evaluation_on_the_tiny_model_writes_the_outputs_file(
    tiny_tokenizer, eval_file, train_file, tmp_path
):
    from booster.models import build_tiny_model

    config = _config(f"attack.task_data={train_file}", f"evaluate.task_data={eval_file}")
    stage = tmp_path / "stage"
    metrics = evaluate_model(
        build_tiny_model(tiny_tokenizer),
        tiny_tokenizer,
        config,
        config.attack.task_data,
        stage / "generations-abc.jsonl",
        progress=False,
        generator="tiny-sft-seed0",
    )
    outputs = stage / "alpaca_eval-abc.json"
    assert metrics["task"] == "alpaca" and metrics["task_samples"] == len(EVAL_ROWS)
    assert metrics["finetune_accuracy"] is None
    assert metrics["finetune_accuracy_pending"] == "alpaca-eval win rate"
    assert metrics["alpaca_eval_outputs"] == str(outputs)
    assert metrics["alpaca_eval_command"] == (
        f"alpaca_eval --model_outputs {outputs} --annotators_config weighted_alpaca_eval_gpt4_turbo"
    )
    assert metrics["task_max_new_tokens"] == config.evaluate.task_max_new_tokens  # the user's own value
    assert "alpaca_eval_reference" not in metrics  # AlpacaEval's own reference outputs are the package's
    rows = json.loads(outputs.read_text())
    assert [set(r) for r in rows] == [KEYS] * len(EVAL_ROWS)
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in EVAL_ROWS]
    assert [r["dataset"] for r in rows] == [r["dataset"] for r in EVAL_ROWS]
    assert {r["generator"] for r in rows} == {"tiny-sft-seed0"}
    generated = [json.loads(line) for line in (stage / "generations-abc.jsonl").read_text().splitlines()]
    task_rows = [g for g in generated if g.get("task") == "alpaca"]
    assert [r["output"] for r in rows] == [g["answer"].strip() for g in task_rows]

    # what alpaca-eval does with a .json --model_outputs: pandas.read_json, one generator name
    import pandas as pd

    frame = pd.read_json(outputs)
    assert set(frame.columns) == KEYS and len(frame) == len(EVAL_ROWS)
    assert frame["generator"].nunique() == 1

    # FA stays None (JSON null) through results.json, with its pending marker
    entry = json.loads(json.dumps(result_entry("sft", "attacked", 0, 0.1, metrics, {})))
    assert entry["finetune_accuracy"] is None
    assert entry["finetune_accuracy_pending"] == "alpaca-eval win rate"
    assert entry["alpaca_eval_outputs"] == str(outputs)


def test_open_ended_defaults_and_task_samples(monkeypatch, eval_file, tmp_path):
    """task_max_new_tokens unset: AlpacaEval's own 1024; set: the user's value, even 256."""
    from booster.evaluation import generation
    from booster.tasks import TASKS

    calls: list[int] = []
    monkeypatch.setattr(generation, "generate", _fake_generate(calls))
    config = _config(
        f"evaluate.task_data={eval_file}", "evaluate.task_samples=2", "evaluate.task_max_new_tokens=null"
    )
    metrics = evaluate_model(None, None, config, None, tmp_path / "generations-x.jsonl", progress=False)
    assert calls == [config.evaluate.max_new_tokens, TASKS["alpaca"].max_new_tokens] == [calls[0], 1024]
    assert metrics["task_max_new_tokens"] == 1024 and metrics["task_samples"] == 2
    rows = json.loads((tmp_path / "alpaca_eval-x.json").read_text())
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in EVAL_ROWS[:2]]
    explicit = _config(
        f"evaluate.task_data={eval_file}", "evaluate.task_samples=2", "evaluate.task_max_new_tokens=256"
    )
    calls.clear()
    evaluate_model(None, None, explicit, None, tmp_path / "generations-y.jsonl", progress=False)
    assert calls[1] == 256
    assert {r["generator"] for r in rows} == {tmp_path.name}  # default: the stage folder's name


def test_other_open_ended_test_split_gets_its_gold_as_reference(monkeypatch, train_file, tmp_path):
    from booster.evaluation import generation

    monkeypatch.setattr(generation, "generate", _fake_generate([]))
    config = _config(f"attack.task_data={train_file}")
    metrics = evaluate_model(
        None, None, config, config.attack.task_data, tmp_path / "generations-y.jsonl", progress=False
    )
    outputs, reference = tmp_path / "alpaca_eval-y.json", tmp_path / "alpaca_eval_reference-y.json"
    assert metrics["finetune_accuracy"] is None and metrics["alpaca_eval_reference"] == str(reference)
    assert f"--reference_outputs {reference}" in metrics["alpaca_eval_command"]
    model_rows, reference_rows = json.loads(outputs.read_text()), json.loads(reference.read_text())
    assert [r["instruction"] for r in model_rows] == [r["instruction"] for r in reference_rows]
    test = load_task(str(train_file), "test", limit=config.evaluate.task_samples)
    assert len(model_rows) == len(test) and [r["output"] for r in reference_rows] == [e.output for e in test]
    with_input = next(e for e in test if e.input)
    assert f"{with_input.instruction}\n\n{with_input.input}" in [r["instruction"] for r in model_rows]


def test_booster_evaluate_prints_the_alpaca_eval_command(capsys, eval_file, train_file, tmp_path):
    args = [
        "--config",
        "configs/tiny.yaml",
        "--output-dir",
        str(tmp_path / "run"),
        "--no-progress",
        "--set",
        "methods=[sft]",
        "--set",
        "align.max_steps=1",
        "--set",
        f"attack.task_data={train_file}",
        "--set",
        f"evaluate.task_data={eval_file}",
    ]
    assert main(["align", *args]) == 0
    assert main(["evaluate", *args]) == 0
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if "alpaca_eval --model_outputs" in line]
    path = Path(shlex.split(line.split("run: ", 1)[1])[2])
    assert "FA n/a" in out and "FA pending (alpaca-eval win rate)" in line
    assert line.endswith("--annotators_config weighted_alpaca_eval_gpt4_turbo")
    rows = json.loads(path.read_text())
    assert len(rows) == len(EVAL_ROWS) and all(set(r) == KEYS for r in rows)
    [generator] = {r["generator"] for r in rows}
    assert generator.startswith("tiny-sft-seed0-") and "-eval-" in generator
