"""Before the first training step: everything a command needs is checked (data, judge, model),
relative paths in a config file are read against its folder, and ``attack.mode: reference`` resolves
per method as the reference scripts ran it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from booster.cli import main
from booster.config import load_config, load_sweep
from booster.errors import UserError
from booster.methods.registry import METHODS, attack_mode
from booster.preflight import preflight
from tests.test_user_errors import one_line_error

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


# -- fail fast -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command,overrides,needle",
    [
        ("run", ["evaluate.judge=nope"], "evaluate.judge: unknown judge 'nope'; choose one of:"),
        ("evaluate", ["evaluate.judge=nope"], "evaluate.judge: unknown judge 'nope'"),
        (
            "run",
            ["evaluate.judge=beaver-dam", "evaluate.judge_model=./no/such/folder"],
            "judge 'beaver-dam': no such folder './no/such/folder'",
        ),
        (
            "run",
            ["evaluate.judge=keyword", "evaluate.judge_model=x"],
            "judge 'keyword' does not take the options",
        ),
        ("align", ["align.alignment_data=missing.jsonl"], "align.alignment_data: data spec 'missing.jsonl'"),
        ("attack", ["attack.task_data=beavertails"], "attack.task_data: beavertails has no task data"),
        (
            "attack",
            ["attack.poison_data=embedded:math"],
            "attack.poison_data: data spec 'embedded:math' is a task",
        ),
        (
            "run",
            ["evaluate.harmful_prompts=sst2"],
            "evaluate.harmful_prompts: sst2 has no harmful prompts data",
        ),
        (
            "run",
            ["attack.task_data=alpacaeval"],
            "attack.task_data: data spec 'alpacaeval' is an evaluation set",
        ),
        (
            "evaluate",
            ["evaluate.task_data=gsm9k"],
            "evaluate.task_data: data spec 'gsm9k' is not a known dataset",
        ),
        (
            "align",
            ["model.name=nobody/no-such-model"],
            "model.name='nobody/no-such-model': could not read its config",
        ),
        ("run", ["model.name=./no/model"], "model.name='./no/model': no such file or folder"),
    ],
)
def test_a_wrong_setting_fails_in_one_line_before_any_stage(capsys, tmp_path, command, overrides, needle):
    out = tmp_path / "out"
    argv = [command, "--config", TINY, "--output-dir", str(out), "--no-progress"]
    for override in overrides:
        argv += ["--set", override]
    line = one_line_error(capsys, argv)
    assert needle in line and TINY in line, line
    assert not out.exists(), "nothing may run (no stage folder) before the error"


GOOD = {"instruction": "Explain how to do it.", "output": "Sure, like this."}
LABELLED = {"instruction": "Sentiment?", "input": "a fine film", "output": "positive", "label": "positive"}


def write_rows(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "command,setting,files,needle",
    [
        ("run", "attack.poison_data", {"p.jsonl": [GOOD, {"instruction": "q"}]}, "line 2: missing field 'output'"),
        ("attack", "attack.poison_data", {"p.jsonl": [GOOD, '{"instr']}, "line 2: invalid JSON"),
        ("run", "attack.probe_data", {"p.jsonl": [GOOD, {"output": "a"}]}, "line 2: missing field 'instruction'"),
        ("run", "evaluate.harmful_prompts", {"p.jsonl": [GOOD, {"instruction": ""}]}, "line 2: field 'instruction' is empty"),
        ("evaluate", "evaluate.harmful_prompts", {"p.jsonl": [GOOD, "{"]}, "line 2: invalid JSON"),
        ("run", "attack.task_data", {"t/train.jsonl": [LABELLED, {"instruction": "s"}], "t/test.jsonl": [LABELLED]}, "train.jsonl line 2"),
        ("run", "attack.task_data", {"t/train.jsonl": [LABELLED], "t/test.jsonl": [LABELLED, {"input": "x"}]}, "test.jsonl line 2"),
        ("run", "attack.task_data", {"t/train.jsonl": [LABELLED]}, "holds train data, not test"),
    ],
)  # fmt: skip
def test_a_bad_row_in_any_data_the_grid_reads_fails_before_any_stage(
    capsys, tmp_path, command, setting, files, needle
):
    """Every data file is read whole up front: a bad row of the attack's or the evaluation's data
    must not wait until the alignment has trained, nor leave a stage folder behind."""
    paths = [write_rows(tmp_path / "data" / name, rows) for name, rows in files.items()]
    spec = paths[0].parent if setting == "attack.task_data" else paths[0]
    out = tmp_path / "out"
    argv = [
        command,
        "--config",
        TINY,
        "--output-dir",
        str(out),
        "--no-progress",
        "--set",
        f"{setting}={spec}",
    ]
    line = one_line_error(capsys, argv)
    assert f"{setting}: " in line and needle in line, line
    assert not out.exists(), "nothing may run (no stage folder) before the error"


def test_each_command_checks_what_it_runs(tmp_path):
    wrong_judge = load_sweep(TINY, ["evaluate.judge=nope"])
    preflight(wrong_judge, "align")  # aligning never judges
    preflight(wrong_judge, "attack")
    with pytest.raises(UserError, match="evaluate.judge"):
        preflight(wrong_judge, "run")
    no_poison = load_sweep(TINY, ["attack.poison_data=missing.jsonl"])
    preflight(no_poison, "align")
    with pytest.raises(UserError, match="attack.poison_data"):
        preflight(no_poison, "attack")
    no_attack = load_sweep(TINY, ["attack.poison_data=missing.jsonl", "attack.poison_ratios=[]"])
    preflight(no_attack, "run")  # no poison ratio: no attack reads it
    # SFT does not read the harmful set; Booster does
    no_harmful = load_sweep(TINY, ["align.harmful_data=missing.jsonl"])
    preflight(no_harmful, "align", methods=["sft"])
    with pytest.raises(UserError, match="align.harmful_data"):
        preflight(no_harmful, "align", methods=["booster"])
    # a swept data setting: every value is checked
    with pytest.raises(UserError, match="'missing'"):
        preflight(load_sweep(TINY, ["attack.task_data=[sst2, missing]"]), "attack")


def test_a_dry_run_checks_only_what_does_not_depend_on_this_machine():
    """A config for another machine: its paths, model and judge model may exist only there."""
    elsewhere = [
        "align.alignment_data=/cluster/data/refusals.jsonl",
        "attack.task_data=sst2:/cluster/data/sst2",
        "model.name=nobody/no-such-model",
        "evaluate.judge=beaver-dam",
        "evaluate.judge_model=/cluster/models/beaver-dam-7b",
    ]
    sweep = load_sweep(TINY, elsewhere)
    preflight(sweep, "run", local=False)
    with pytest.raises(UserError, match="model.name"):  # here, everything counts
        preflight(sweep, "run")
    with pytest.raises(UserError, match="align.alignment_data"):
        preflight(load_sweep(TINY, elsewhere[:2]), "run")
    with pytest.raises(UserError, match="beaver-dam"):
        preflight(load_sweep(TINY, elsewhere[3:]), "run")
    for wrong, needle in [
        ("attack.task_data=beavertails", "beavertails has no task data"),
        ("evaluate.judge=nope", "unknown judge"),
        ("align.harmful_data=sst3", "not a known dataset"),
    ]:
        with pytest.raises(UserError, match=needle):
            preflight(load_sweep(TINY, [*elsewhere, wrong]), "run", local=False)


def test_a_local_model_folder_needs_a_readable_config(tmp_path):
    from booster.models import ModelConfig, check_model

    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        check_model(ModelConfig(name=str(folder)))
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(UserError, match="could not read its config from the folder"):
        check_model(ModelConfig(name=str(folder)))
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    check_model(ModelConfig(name=str(folder)))  # no weights are read
    check_model(ModelConfig(name="tiny"))


# -- relative paths --------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder_then_the_working_directory(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "align.jsonl").write_text(
        Path(REPO / "configs/data/tiny/alignment.jsonl").read_text()
    )
    (tmp_path / "old.jsonl").write_text("")
    (project / "embedded").write_text("")  # a keyword stays a keyword even if a file has its name
    config_file = project / "c.yaml"
    config_file.write_text(
        "model: tiny\n"
        "align: {alignment_data: data/align.jsonl, harmful_data: old.jsonl}\n"
        f"attack: {{task_data: 'sst2:data/align.jsonl', poison_data: {tmp_path / 'old.jsonl'}, probe_data: embedded}}\n"
    )
    monkeypatch.chdir(tmp_path)
    config = load_config("project/c.yaml")
    assert config.align.alignment_data == "project/data/align.jsonl"  # next to the config
    assert config.align.harmful_data == "old.jsonl"  # not there: the working directory's
    assert config.attack.task_data == "sst2:project/data/align.jsonl"  # NAME:PATH
    assert config.attack.poison_data == str(tmp_path / "old.jsonl")  # absolute: unchanged
    assert config.attack.probe_data == "embedded" and config.model.name == "tiny"
    # --set keeps its meaning: relative to the working directory
    assert load_config("project/c.yaml", ["align.alignment_data=data/align.jsonl"]).align.alignment_data == (
        "data/align.jsonl"
    )
    # the config given by an absolute path: its data by absolute path
    assert load_config(config_file).align.alignment_data == str(project / "data" / "align.jsonl")
    # the repository's configs read the same from its root as before (stage folders keep their names)
    monkeypatch.chdir(REPO)
    assert load_config("configs/tiny.yaml").align.alignment_data == "configs/data/tiny/alignment.jsonl"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The tiny config run from another working directory, with the reference attack modes."""
    import os

    elsewhere = tmp_path_factory.mktemp("elsewhere")
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        argv = [
            "run",
            "--config",
            TINY,
            "--output-dir",
            "out",
            "--no-progress",
            "--set",
            "attack.mode=reference",
        ]
        assert main(argv) == 0
    finally:
        os.chdir(cwd)
    return elsewhere / "out"


def test_the_tiny_config_runs_from_another_working_directory(reference_run):
    results = json.loads((reference_run / "results.json").read_text())
    assert {(r["method"], r["stage"]) for r in results} == {
        (m, s) for m in ("sft", "booster") for s in ("aligned", "attacked")
    }


# -- attack.mode: reference ------------------------------------------------------------------------


def test_reference_modes_are_the_reference_scripts():
    # a combination keeps the mode of the method it extends (sft+antidote repairs sft's attack)
    double = {f"{m}{extra}" for m in ("sft", "vaccine", "repnoise") for extra in ("", "+mix", "+antidote")}
    double |= {f"{m}+mix+antidote" for m in ("sft", "vaccine", "repnoise")}
    assert {name for name, m in METHODS.items() if m.attack_mode == "double_lora"} == double
    for name in METHODS:
        assert attack_mode("reference", name) == ("double_lora" if name in double else "single_lora")
        assert attack_mode("single_lora", name) == "single_lora"


def test_reference_mode_shares_the_stage_of_the_mode_it_resolves_to():
    from booster.stages.attack import attack_dir

    def folder(mode: str, method: str) -> Path:
        return attack_dir(load_config(TINY, [f"attack.mode={mode}"]), method, 0, 0.1)

    assert folder("reference", "sft") == folder("double_lora", "sft") != folder("single_lora", "sft")
    assert (
        folder("reference", "booster") == folder("single_lora", "booster") != folder("double_lora", "booster")
    )
    assert folder("reference", "lisa") == folder("single_lora", "lisa")
    with pytest.raises(UserError, match="attack.mode=reference needs model.lora.enabled=true"):
        load_config(TINY, ["attack.mode=reference", "model.lora.enabled=false"])


def test_reference_mode_is_recorded_in_done_json_and_results(reference_run):
    results = json.loads((reference_run / "results.json").read_text())
    modes = {r["method"]: r.get("attack_mode") for r in results if r["stage"] == "attacked"}
    assert modes == {"sft": "double_lora", "booster": "single_lora"}
    assert all("attack_mode" not in r for r in results if r["stage"] == "aligned")
    done = {
        json.loads(p.read_text())["method"]: json.loads(p.read_text())
        for p in (reference_run / "attack").glob("*/done.json")
    }
    assert (
        done["sft"]["mode"] == "double_lora" and done["sft"]["recipe"]["merge"]
    )  # the aligned adapter merged
    assert done["booster"]["mode"] == "single_lora" and not done["booster"]["recipe"]["merge"]


def test_paper_configs_attack_in_the_reference_modes():
    for path in sorted((REPO / "configs" / "paper").glob("*.yaml")):
        assert load_sweep(path).base.attack.mode == "reference", path.name
