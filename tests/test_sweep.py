"""Sweeps: lists under align/attack expand into a grid, each cell runs once, stages are reused,
and the report gets one paper-layout table (and plot) per swept setting."""

from __future__ import annotations

import json

import pytest
import torch

from booster.cli import main
from booster.config import AlignConfig, AttackConfig, load_config, load_sweep, sweepable_fields
from booster.errors import UserError
from booster.methods.registry import METHODS
from booster.pipeline import run_pipeline
from booster.plan import cells
from booster.report import write_report
from booster.report.tables import sweep_grid, sweep_table


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_every_scalar_of_align_and_attack_can_be_swept():
    align, attack = sweepable_fields("align"), sweepable_fields("attack")
    assert {
        "lamb",
        "alpha",
        "learning_rate",
        "max_steps",
        "vaccine_rho",
        "repnoise_alpha",
        "repnoise_beta",
    } <= set(align)
    assert {"learning_rate", "max_steps", "samples", "lisa_rho", "task_data"} <= set(attack)
    assert "poison_ratios" not in attack  # already a list: every cell runs all of them
    # a list of trackers, a name outside the fingerprint, a mapping of Trainer settings
    not_swept = {"report_to", "run_name", "trainer"}
    assert not_swept.isdisjoint(align) and not_swept.isdisjoint(attack)
    assert len(align) == len(AlignConfig.__dataclass_fields__) - len(not_swept)
    assert len(attack) == len(AttackConfig.__dataclass_fields__) - 1 - len(not_swept)


def test_grid_is_the_cartesian_product_in_order_with_the_swept_record(tmp_path):
    # attack listed first in the file: the grid still takes align before attack (field order)
    text = "model: tiny\nmethods: [sft, booster]\nseeds: [0, 1]\nattack:\n  learning_rate: [1.0e-4, 1.0e-3]\nalign:\n  lamb: [1, 5]\n"
    sweep = load_sweep(write(tmp_path, text))
    assert sweep.variables == {"align.lamb": [1.0, 5.0], "attack.learning_rate": [1e-4, 1e-3]}
    assert (sweep.base.align.lamb, sweep.base.attack.learning_rate) == (1.0, 1e-4)
    grid = cells(sweep)
    got = [(c.seed, c.method, c.sweep) for c in grid]
    expected = []
    for seed in (0, 1):
        # sft does not read lamb: it is swept over the attack's learning rate only
        expected += [(seed, "sft", {"attack.learning_rate": lr}) for lr in (1e-4, 1e-3)]
        expected += [
            (seed, "booster", {"align.lamb": lamb, "attack.learning_rate": lr})
            for lamb in (1.0, 5.0)
            for lr in (1e-4, 1e-3)
        ]
    assert got == expected
    for c in grid:  # each cell's config holds its values (and the first value of the others)
        assert c.config.attack.learning_rate == c.sweep["attack.learning_rate"]
        assert c.config.align.lamb == c.sweep.get("align.lamb", 1.0)
        assert c.config.seeds == [0, 1] and isinstance(c.config.align.lamb, float)
    # the sweep writes itself back as the YAML it came from
    assert load_sweep(write(tmp_path, json.dumps(sweep.to_dict()))).variables == sweep.variables


def test_method_hyperparameters_sweep_only_their_methods():
    sweep = load_sweep(
        "configs/tiny.yaml",
        [
            "methods=[sft, vaccine, repnoise, lisa]",
            "align.vaccine_rho=[1, 2]",
            "align.repnoise_beta=[0.001, 0.01]",
            "attack.lisa_rho=[0.01, 0.1]",
        ],
    )
    count = {m: sum(1 for c in cells(sweep) if c.method == m) for m in sweep.base.methods}
    assert count == {"sft": 1, "vaccine": 2, "repnoise": 2, "lisa": 2}


@pytest.mark.parametrize(
    "override,needle",
    [
        ("align.lamb=[1, abc]", "align.lamb[1] must be a number, got 'abc'"),
        ("attack.max_steps=[2, 2.5]", "attack.max_steps[1] must be an integer, got 2.5"),
        ("align.lamb=[[1, 2]]", "align.lamb[0] must be a number, got [1, 2]"),
        ("align.lamb=[]", "align.lamb is an empty list; give one value, or a list of values to sweep"),
        ("align.lamb=[5, 5.0]", "align.lamb lists 5.0 twice"),
        ("attack.samples=[10, 0]", "attack.samples must be >= 1, got 0"),
        ("align.learning_rate=[1e-4, -1]", "align.learning_rate must be > 0, got -1.0"),
        ("align.vaccine_target=[attention, mlp]", "align.vaccine_target='mlp'; use attention or decoder"),
        ("evaluate.max_new_tokens=[8, 16]", "a list sweeps a setting only under align: or attack:"),
    ],
)
def test_a_bad_list_element_is_one_line_naming_key_and_value(override, needle, capsys):
    with pytest.raises(UserError) as err:
        load_sweep("configs/tiny.yaml", [override])
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert main(["run", "--config", "configs/tiny.yaml", "--dry-run", "--set", override]) == 2
    stderr = capsys.readouterr().err
    assert needle in stderr and stderr.count("\n") == 1 and "Traceback" not in stderr


def test_a_combination_is_validated_too():
    with pytest.raises(UserError, match="set both"):
        load_sweep(
            "configs/tiny.yaml", ["attack.lisa_alignment_steps=[null, 3]", "attack.lisa_finetune_steps=3"]
        )


def test_load_config_wants_one_value_and_yaml_exponents_are_numbers():
    with pytest.raises(UserError, match="align.lamb lists several values .* use `booster run`"):
        load_config("configs/tiny.yaml", ["align.lamb=[1, 5]"])
    # PyYAML reads 1e-3 (no dot) as a string; a float field takes it as the number
    config = load_config("configs/tiny.yaml", ["align.learning_rate=1e-3"])
    assert config.align.learning_rate == 1e-3
    assert load_sweep("configs/tiny.yaml", ["attack.learning_rate=[1e-5, 2e-5]"]).variables == {
        "attack.learning_rate": [1e-5, 2e-5]
    }


def test_pass_counts_live_in_the_registry():
    passes = {name: m.align_passes for name, m in METHODS.items()}
    for name, method in METHODS.items():  # a combination aligns like the method it extends
        assert passes[name] == passes[method.aligns_like or name], name
    passes = {name: n for name, n in passes.items() if not name.endswith(("+mix", "+antidote"))}
    assert passes == {
        "sft": 1,
        "booster": 3,
        "vaccine": 2,
        "repnoise": 2,
        "lisa": 1,
        "booster+vaccine": 4,
        "booster+lisa": 3,
        "booster-from-sft": 3,  # its SFT start's one pass is counted where that stage runs
        "booster+ascent": 3,  # the ascent reuses pass 1's harmful gradient
    }


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and far faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_swept_attack_setting_reuses_the_alignment_and_extending_runs_only_new_cells(tmp_path, one_thread):
    small = ["methods=[booster]", "align.max_steps=2", "attack.max_steps=2", "evaluate.task_samples=2"]
    lines: list[str] = []

    def run(*sets):
        lines.clear()
        return run_pipeline(
            load_sweep("configs/tiny.yaml", [*small, f"output_dir={tmp_path}", *sets]), False, lines.append
        )

    path = run("attack.learning_rate=[1.0e-3, 2.0e-3]")
    assert len(list((tmp_path / "align").iterdir())) == 1
    assert len(list((tmp_path / "attack").iterdir())) == 2
    results = json.loads(path.read_text())
    attacked = [r for r in results if r["stage"] == "attacked"]
    assert [r["sweep"] for r in attacked] == [{"attack.learning_rate": 1e-3}, {"attack.learning_rate": 2e-3}]
    assert [r["sweep"] for r in results if r["stage"] == "aligned"] == [
        {"attack.learning_rate": 1e-3},
        {"attack.learning_rate": 2e-3},
    ]
    assert (
        sum("align done" in line for line in lines) == 1
        and sum("align reused" in line for line in lines) == 1
    )

    # extend the grid: one new attack, nothing else trains again
    run("attack.learning_rate=[1.0e-3, 2.0e-3, 4.0e-3]")
    assert len(list((tmp_path / "align").iterdir())) == 1
    assert len(list((tmp_path / "attack").iterdir())) == 3
    assert [line for line in lines if " done (" in line] == [
        line for line in lines if "learning_rate=0.004 p=0.1] attack done" in line
    ]
    report = (tmp_path / "report.md").read_text()
    assert "### attack.learning_rate" in report
    assert "| method | learning_rate=0.001 | learning_rate=0.002 | learning_rate=0.004 | average |" in report
    assert (tmp_path / "sweep-attack-learning_rate.png").stat().st_size > 1000

    # a swept alignment setting is a new alignment per value
    run("align.lamb=[1, 2]")
    assert len(list((tmp_path / "align").iterdir())) == 3  # lamb=1 is not the config's lamb=5


def test_booster_align_runs_each_alignment_of_a_sweep_once(tmp_path, capsys, one_thread):
    argv = ["align", "--config", "configs/tiny.yaml", "--output-dir", str(tmp_path), "--no-progress"]
    sets = ["methods=[sft]", "align.max_steps=1", "attack.learning_rate=[1.0e-3, 2.0e-3]"]
    assert main([*argv, *(x for s in sets for x in ("--set", s))]) == 0
    assert capsys.readouterr().out.count("align sft seed 0") == 1


# -- report from a hand-written results.json -------------------------------------------------------


def entry(method, seed, stage, hs, fa, sweep, ratio=0.1, pending=False):
    e = {
        "method": method,
        "stage": stage,
        "seed": seed,
        "poison_ratio": ratio if stage == "attacked" else None,
        "sweep": sweep,
        "harmful_score": hs,
        "finetune_accuracy": fa,
        "judge": "keyword",
    }
    if pending:
        e["finetune_accuracy_pending"] = "alpaca-eval win rate"
    return e


HAND_WRITTEN = [
    # sft does not read lamb: no lamb in its record, one model per seed
    entry("sft", 0, "aligned", 1.0, 10.0, {}),
    entry("sft", 0, "attacked", 40.0, 90.0, {}),
    entry("sft", 1, "aligned", 3.0, 12.0, {}),
    entry("sft", 1, "attacked", 50.0, 92.0, {}),
    entry("booster", 0, "aligned", 1.0, 10.0, {"align.lamb": 5.0}),
    entry("booster", 0, "attacked", 10.0, 80.0, {"align.lamb": 5.0}),
    entry("booster", 1, "aligned", 1.0, 10.0, {"align.lamb": 5.0}),
    entry("booster", 1, "attacked", 20.0, 84.0, {"align.lamb": 5.0}),
    entry("booster", 0, "aligned", 2.0, None, {"align.lamb": 1.0}, pending=True),
    entry("booster", 0, "attacked", 30.0, None, {"align.lamb": 1.0}, pending=True),
    entry("booster", 1, "aligned", 2.0, None, {"align.lamb": 1.0}, pending=True),
    entry("booster", 1, "attacked", 34.0, None, {"align.lamb": 1.0}, pending=True),
]


def test_report_tables_for_a_swept_setting_from_results_json_alone(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps(HAND_WRITTEN))
    (tmp_path / "judge-keyword.json").write_text(json.dumps({"accuracy": 0.5}))
    assert main(["report", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    table = report.split("### align.lamb")[1].split("![")[0]
    # columns in ascending order; mean ± std over the two seeds; pending FA never a number and
    # left out of the average; sft (which does not read lamb) stands in every column
    assert "| method | lamb=1 | lamb=5 | average |" in table
    assert "| sft | 45.0±7.1 / 91.0±1.4 | 45.0±7.1 / 91.0±1.4 | 45.0 / 91.0 |" in table
    assert "| booster | 32.0±2.8 / pending | 15.0±7.1 / 82.0±2.8 | 23.5 / 82.0 |" in table
    assert "sft does not read `align.lamb`" in table
    assert (tmp_path / "sweep-align-lamb.png").stat().st_size > 1000
    # the p table keeps one row per method and swept value
    assert "| booster (lamb=1) | 2.0±0.0 / pending | 32.0±2.8 / pending | 32.0 / pending |" in report
    assert "| sft | 2.0±1.4 / 11.0±1.4 | 45.0±7.1 / 91.0±1.4 | 45.0 / 91.0 |" in report
    assert "No config.yaml in this folder" in report and "## Judge: `keyword`" in report


def test_sweep_rows_split_by_the_other_swept_settings_and_ratios():
    rows = []
    for lamb in (1.0, 5.0):
        for lr in (1e-5, 1e-4):
            for p in (0.1, 0.2):
                sweep = {"align.lamb": lamb, "attack.learning_rate": lr}
                rows.append(entry("booster", 0, "attacked", 100 * p + lamb, 50.0, sweep, ratio=p))
    grid = sweep_grid(rows, "align.lamb")
    assert list(grid.rows) == [
        "booster (learning_rate=1e-05, p=0.1)",
        "booster (learning_rate=1e-05, p=0.2)",
        "booster (learning_rate=0.0001, p=0.1)",
        "booster (learning_rate=0.0001, p=0.2)",
    ]
    assert (
        "| booster (learning_rate=1e-05, p=0.2) | 21.0 / 50.0 | 25.0 / 50.0 | 23.0 / 50.0 |"
        in sweep_table(grid)
    )


def test_write_report_keeps_the_sweep_in_config_yaml(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(HAND_WRITTEN))
    (tmp_path / "judge-keyword.json").write_text(json.dumps({"accuracy": 0.5}))
    sweep = load_sweep("configs/tiny.yaml", ["align.lamb=[1, 5]", "evaluate.judge=keyword"])
    write_report(tmp_path, sweep)
    (tmp_path / "report.md").unlink()
    write_report(tmp_path)  # from the folder: config.yaml reads back as the same sweep
    report = (tmp_path / "report.md").read_text()
    assert "lamb [1.0, 5.0]" in report and "- swept: `align.lamb` in [1, 5]" in report
