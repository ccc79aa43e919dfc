"""`booster run --dry-run`: the grid and its cost, then the whole grid at tiny sizes, for every
shipped config (globbed at test time, so configs added later are covered too)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from booster.cli import main
from booster.config import RunConfig, Sweep, load_sweep
from booster.cost import format_count, model_size
from booster.dryrun import (
    BROKEN_EXPECTED,
    _seconds,
    cost_lines,
    duration,
    estimate,
    plan_lines,
    progress,
    progress_lines,
    stage_time,
    tiny_sweep,
)
from booster.plan import cells, planned_steps

CONFIGS = sorted(p for p in Path("configs").rglob("*.yaml") if "accelerate" not in p.parts)


def test_configs_are_found():
    assert Path("configs/tiny.yaml") in CONFIGS and Path("configs/quickstart.yaml") in CONFIGS


@pytest.fixture(scope="module")
def shared_output(tmp_path_factory) -> Path:
    """One output dir for all configs: tiny stages that come out identical (the paper configs differ
    mostly in model and task, which the dry run replaces) run once and are reused, as in a real grid."""
    return tmp_path_factory.mktemp("dry-runs")


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_dry_run_of_every_shipped_config(path, shared_output, capsys):
    tmp_path = shared_output
    started = time.time()
    assert (
        main(["run", "--config", str(path), "--dry-run", "--output-dir", str(tmp_path), "--no-progress"]) == 0
    )
    seconds = time.time() - started
    out = capsys.readouterr().out
    sweep = load_sweep(path)
    grid = cells(sweep)
    ratios = sweep.base.attack.poison_ratios
    # the plan: a header, one line per cell, a total; then the cost: a header, one line per cell,
    # the grid's total and how it was counted
    # and what of it is done in the output folder: nothing here (only the dry run's own folder)
    plan, rest = out.split("dry run at tiny sizes")[0].split("  cost on one GPU")
    cost, progress = rest.split("  progress in ")
    plan = [line for line in plan.splitlines() if not line.strip().startswith("note: ")]
    cost = cost.splitlines()
    assert len(plan) == 1 + 1 + len(grid) + 1 and plan[-1].strip().startswith(f"total: {len(grid)} cells")
    assert len(cost) == 2 + len(grid) + 2 and cost[-2].strip().startswith("grid: ")
    stages = sum(len(e.stages) for e in estimate(sweep, tmp_path))
    assert progress.startswith(f"{tmp_path}: nothing done yet") and f"to run: {stages} stages" in progress
    assert [line.split()[1] for line in cost[2 : 2 + len(grid)]] == [c.method for c in grid]
    size = model_size(sweep.base.model)  # tiny, embedded: real counts; a hub model: its cached config
    if sweep.base.model.name in ("tiny", "embedded"):
        assert size is not None
    if size is None:
        assert "parameters unknown" in cost[0]
    else:
        assert f"{format_count(size.parameters)} parameters" in cost[0] and "memory unknown" not in cost[-2]
        if all(e.passes is not None for e in estimate(sweep)):  # every size known ("all" samples is not)
            assert "unknown" not in cost[-2]
    assert "dry run passed" in out
    assert out.count(BROKEN_EXPECTED) == (1 if "] aligned: BROKEN (" in out else 0)  # said once
    # everything went to {output_dir}/dry-run, on the tiny model, with the real grid
    assert [p.name for p in tmp_path.iterdir()] == ["dry-run"]
    results = json.loads((tmp_path / "dry-run" / "results.json").read_text())
    attacked = [(r["seed"], r["method"], r["poison_ratio"]) for r in results if r["stage"] == "attacked"]
    assert attacked == [(c.seed, c.method, p) for c in grid for p in ratios]
    config = (tmp_path / "dry-run" / "config.yaml").read_text()
    assert "name: tiny" in config
    print(f"{path}: dry run {seconds:.1f}s for {len(grid)} cells")


def test_dry_run_keeps_the_grid_and_shrinks_only_sizes():
    sweep = load_sweep(
        "configs/compare.yaml",
        ["attack.samples=[1000, 500, 2000]", "align.lamb=[1, 5]", "attack.learning_rate=[1.0e-5, 1.0e-4]"],
    )
    tiny, notes = tiny_sweep(sweep)
    assert tiny.variables == {
        "align.lamb": [1.0, 5.0],
        "attack.samples": [5, 4, 6],  # apart and in the same order: the i-th smallest -> 4 + i
        "attack.learning_rate": [1e-5, 1e-4],
    }
    assert tiny.base.methods == sweep.base.methods and tiny.base.seeds == sweep.base.seeds
    assert (
        tiny.base.align.alpha == sweep.base.align.alpha
        and tiny.base.attack.lisa_rho == sweep.base.attack.lisa_rho
    )
    assert tiny.base.model.name == "tiny" and tiny.base.model.lora == sweep.base.model.lora
    assert (tiny.base.align.max_steps, tiny.base.attack.max_steps, tiny.base.evaluate.max_new_tokens) == (
        2,
        2,
        4,
    )
    assert tiny.base.output_dir == "runs/compare/dry-run"
    assert tiny.base.evaluate.judge == "keyword" and any("judge" in n for n in notes)
    assert len(cells(tiny)) == len(cells(sweep))
    # a swept data set collapses to the tiny one, and the notes say so
    tiny, notes = tiny_sweep(load_sweep("configs/tiny.yaml", ["attack.task_data=[sst2, agnews]"]))
    assert "attack.task_data" not in tiny.variables and any("attack.task_data" in n for n in notes)


def test_cost_estimate_per_cell():
    config = RunConfig(methods=["sft", "booster", "repnoise"])  # the paper's sizes
    assert planned_steps(config.align, 5000) == 10_000  # 5000 / batch 10 x 20 epochs
    assert planned_steps(config.attack, 1000) == 2_000
    assert planned_steps(config.align, None) is None  # "all samples" of a data set that was not counted
    paper_data = ["align.alignment_data=beavertails_refusals", "align.harmful_data=beavertails"]
    sweep = load_sweep(
        None, [*paper_data, "methods=[sft, booster, repnoise]", "attack.learning_rate=[1.0e-5, 1.0e-4]"]
    )
    plan = {(e.cell.method, e.cell.config.attack.learning_rate): e for e in estimate(sweep)}
    assert plan[("sft", 1e-5)].passes == 10_000 + 2_000
    assert plan[("booster", 1e-5)].passes == 3 * 10_000 + 2_000
    assert plan[("repnoise", 1e-5)].passes == 2 * 10_000 + 2_000
    shared = plan[("booster", 1e-4)]  # the same alignment as the cell before: only its attack counts
    assert shared.shared and shared.passes == 2_000
    assert isinstance(sweep, Sweep)


def _rows(path: str) -> int:
    """Non-empty lines of a .jsonl file: the rows it holds, counted without the loaders."""
    return sum(1 for line in Path(path).read_text().splitlines() if line.strip())


def test_all_samples_are_the_rows_the_local_data_holds(tmp_path):
    sweep = load_sweep(
        "configs/tiny.yaml",
        [
            "align.alignment_samples=null",
            "align.harmful_samples=null",
            "align.max_steps=-1",
            "align.epochs=3",
            "align.batch_size=5",
            f"output_dir={tmp_path}",
        ],
    )
    rows = _rows(sweep.base.align.alignment_data)
    harmful = _rows(sweep.base.align.harmful_data)
    assert rows == 12 and harmful == 12
    plan = {e.cell.method: e for e in estimate(sweep)}
    assert plan["sft"].align_steps == plan["booster"].align_steps == 3 * math.ceil(rows / 5) == 9
    assert plan["booster"].harmful_samples == harmful and plan["sft"].harmful_rows is None
    assert plan["sft"].passes == 9 + 4 and plan["booster"].passes == 3 * 9 + 4  # + one attack of 4 steps
    lines = plan_lines(sweep, list(plan.values()))
    assert "9 x 1" in lines[1] and "align 12 (all)" in lines[1] and "harmful 12 (all)" in lines[2]
    assert not any(line.startswith("note:") for line in lines)
    # a limit above what the data holds reads what there is
    sweep = load_sweep(
        "configs/tiny.yaml",
        ["align.alignment_samples=100", "align.max_steps=-1", "align.epochs=1", "align.batch_size=4"],
    )
    sft = estimate(sweep, tmp_path)[0]
    assert sft.align_samples == rows and sft.align_steps == math.ceil(rows / 4)
    assert "align 12 (of 100)" in plan_lines(sweep, [sft])[1]


def test_a_size_that_cannot_be_counted_stays_unknown_and_says_why(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    for spec, why in ((str(broken), "broken.jsonl line 2"), ("beavertails_refusals", "hub dataset")):
        sweep = load_sweep(
            "configs/tiny.yaml",
            [f"align.alignment_data={spec}", "align.alignment_samples=null", "align.max_steps=-1"],
        )
        plan = estimate(sweep, tmp_path)
        assert plan[0].align_steps is None and plan[0].passes is None
        note = [line for line in plan_lines(sweep, plan) if line.startswith("note:")]
        assert len(note) == 1 and why in note[0] and "steps unknown" in note[0], note


def test_attacks_and_evaluations_that_cells_share_count_once(tmp_path):
    """`reference` resolves to single_lora for Booster: its cells of both modes share every stage."""
    from booster.stages.attack import attack_dir

    sweep = load_sweep(
        "configs/tiny.yaml",
        ["attack.mode=[single_lora, reference]", "attack.poison_ratios=[0.1, 0.2]", f"output_dir={tmp_path}"],
    )
    plan = estimate(sweep)
    grid = [(e.cell.method, e.cell.config.attack.mode) for e in plan]
    assert grid == [
        ("sft", "single_lora"),
        ("sft", "reference"),
        ("booster", "single_lora"),
        ("booster", "reference"),
    ]
    folders = {attack_dir(e.cell.config, e.cell.method, 0, p) for e in plan for p in (0.1, 0.2)}
    assert len(folders) == 6  # sft twice (double_lora under reference), booster once
    assert [e.attacks for e in plan] == [2, 2, 2, 0] and sum(e.attacks for e in plan) == len(folders)
    assert [len(e.evaluations) for e in plan] == [3, 2, 3, 0]  # one per model: 2 aligned + 6 attacked
    assert plan[3].passes == 0 and plan[1].passes == 2 * 4  # shared alignment, two new attacks
    lines = plan_lines(sweep, plan)
    assert lines[4].split()[4:6] == ["shared", "shared"] and "eval 0 x" in lines[4]
    assert lines[-1].startswith("total: 4 cells, 2 alignments, 6 attacks, ") and "8 evaluations" in lines[-1]
    cost = cost_lines(sweep, plan, model_size(sweep.base.model))
    assert cost[5].split()[3:6] == ["0", "0", "-"]  # the shared cell costs nothing more


def test_a_resumed_stage_is_timed_by_the_steps_it_trained():
    done = {
        "steps": 10,
        "seconds": 50.0,
        "seconds_per_step": 2.0,
        "resumed_from": "x/checkpoints/checkpoint-6",
    }
    assert stage_time(done) == (4, 20.0, 30.0)  # 20 s of training over 4 steps, 30 s around it
    assert stage_time({**done, "resumed_from": None}) == (10, 20.0, 30.0)
    # trained_steps says which steps seconds_per_step is over: the 4 after the checkpoint
    assert stage_time({**done, "trained_steps": 4, "seconds_per_step": 5.0}) == (4, 20.0, 30.0)
    assert stage_time({"steps": 10, "seconds": 50.0}) == (10, 50.0, 0.0)  # no per-step time recorded
    assert stage_time({"seconds": 50.0}) is None


def test_results_give_a_resumed_stage_the_speed_of_the_steps_it_trained():
    from booster.pipeline import result_entry

    resumed = {"steps": 10, "seconds": 50.0, "resumed_from": "x/checkpoints/checkpoint-6"}
    legacy = {**resumed, "seconds_per_step": 2.0}  # 20 s of training spread over all 10 steps
    current = {**resumed, "seconds_per_step": 5.0, "trained_steps": 4}
    for info in (legacy, current):
        assert result_entry("sft", "aligned", 0, None, {}, info)["train_seconds_per_step"] == 5.0


def test_progress_counts_what_is_done_and_times_the_rest_at_the_measured_speeds(tmp_path):
    from booster.pipeline import run_pipeline
    from booster.stages.align import align_dir
    from booster.storage import read_json

    tiny = ["methods=[sft]", f"output_dir={tmp_path}"]
    run_pipeline(
        load_sweep("configs/tiny.yaml", [*tiny, "seeds=[0]", "attack.poison_ratios=[0.1]"]), progress=False
    )
    # the grid grows by a seed and a poison ratio; seed 1's alignment was cut at its checkpoint 1
    sweep = load_sweep("configs/tiny.yaml", [*tiny, "seeds=[0, 1]", "attack.poison_ratios=[0.1, 0.2]"])
    (align_dir(sweep.base, "sft", 1) / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    plan = estimate(sweep)
    groups = {g.label: g for g in progress(plan, tmp_path)}
    assert list(groups) == ["align sft", "attack", "evaluation"]
    align, attack, evaluation = groups.values()
    assert (align.done, align.todo, align.resumed, align.steps) == (1, 1, 1, 4 - 1)
    assert (attack.done, attack.todo, attack.steps) == (1, 3, 3 * 4)
    assert (evaluation.done, evaluation.todo) == (2, 4)

    # the measured speeds are the finished stages' own numbers
    def speed(kind: str) -> tuple[float, float]:
        done = json.loads(next((tmp_path / kind).glob("*/done.json")).read_text())
        train = done["seconds_per_step"] * done["trained_steps"]
        return train / done["steps"], done["seconds"] - train

    evals = [read_json(f)["eval_seconds"] for f in tmp_path.glob("*/*/eval-*.json")]
    (a_step, a_other), (t_step, t_other) = speed("align"), speed("attack")
    assert align.speed.per_step == pytest.approx(a_step) and align.speed.overhead == pytest.approx(a_other)
    assert attack.speed.count == 1 and attack.speed.per_step == pytest.approx(t_step)
    assert len(evals) == 2 and evaluation.speed.per_step == pytest.approx(sum(evals) / 2)
    total = (3 * a_step + a_other) + 3 * (4 * t_step + t_other) + 4 * sum(evals) / 2
    assert align.seconds + attack.seconds + evaluation.seconds == pytest.approx(total)
    lines = progress_lines(plan, tmp_path)
    assert len(lines) == 2 + 3 + 1
    assert lines[-1].startswith("2 cells: 2 of 6 stages and 2 of 6 evaluations done (reused); ")
    assert f"to run: 4 stages and 4 evaluations, about {duration(total)} at the measured speeds" in lines[-1]
    assert lines[2].split()[:4] == ["align", "sft", _seconds(a_step), "s/step"] and "1 (1 resume)" in lines[2]
    # other shapes are not timed by these measurements, and the summary says what is not
    wider = load_sweep("configs/tiny.yaml", [*tiny, "seeds=[0]", "attack.batch_size=2"])
    lines = progress_lines(estimate(wider), tmp_path)
    assert lines[3].split()[:2] == ["attack", "unmeasured"] and lines[-1].endswith("+ 1 not timed (attack)")


def test_the_tiny_models_broken_answers_are_explained_once(tmp_path):
    import io

    from booster.dryrun import dry_run

    sweep = load_sweep("configs/tiny.yaml", [f"output_dir={tmp_path}", "attack.poison_ratios=[0.1, 0.2]"])
    out = io.StringIO()
    dry_run(sweep, out=out)
    lines = out.getvalue().splitlines()
    broken = [i for i, line in enumerate(lines) if ": BROKEN (" in line]
    assert len(broken) == 6  # 2 methods x (aligned + 2 attacks): a random model answers with noise
    notes = [i for i, line in enumerate(lines) if BROKEN_EXPECTED in line]
    assert notes == [broken[0] + 1]  # right after the first, and only there
    assert lines[-1].startswith("dry run passed")
