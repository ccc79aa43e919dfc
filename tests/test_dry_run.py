"""`booster run --dry-run`: the grid and its cost, then the whole grid at tiny sizes, for every
shipped config (globbed at test time, so configs added later are covered too)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from booster.cli import main
from booster.config import RunConfig, Sweep, load_sweep
from booster.cost import format_count, model_size
from booster.dryrun import estimate, planned_steps, tiny_sweep
from booster.pipeline import cells

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
    plan, cost = out.split("dry run at tiny sizes")[0].split("  cost on one GPU")
    plan, cost = plan.splitlines(), cost.splitlines()
    assert len(plan) == 1 + 1 + len(grid) + 1 and plan[-1].strip().startswith(f"total: {len(grid)} cells")
    assert len(cost) == 2 + len(grid) + 2 and cost[-2].strip().startswith("grid: ")
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
    assert planned_steps(config.align, None) is None  # "all samples": unknown here
    sweep = load_sweep(None, ["methods=[sft, booster, repnoise]", "attack.learning_rate=[1.0e-5, 1.0e-4]"])
    plan = {(e.cell.method, e.cell.config.attack.learning_rate): e for e in estimate(sweep)}
    assert plan[("sft", 1e-5)].passes == 10_000 + 2_000
    assert plan[("booster", 1e-5)].passes == 3 * 10_000 + 2_000
    assert plan[("repnoise", 1e-5)].passes == 2 * 10_000 + 2_000
    shared = plan[("booster", 1e-4)]  # the same alignment as the cell before: only its attack counts
    assert shared.shared and shared.passes == 2_000
    assert isinstance(sweep, Sweep)
