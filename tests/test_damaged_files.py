"""Files of a run folder that a fault or a hand can damage: a cached judge validation is checked and
rebuilt like a stage; a damaged results.json, run config or archived file is one line naming it and
what to do, never a traceback; YAML is read safely."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from booster.archive import archive_run
from booster.cli import main
from tests.test_user_errors import one_line_error

SMALL = [
    "methods=[sft]",
    "align.max_steps=2",
    "attack.max_steps=2",
    "evaluate.harmful_samples=2",
    "evaluate.task_samples=2",
]


def run_args(out: Path, *extra: str) -> list[str]:
    argv = ["run", "--config", "configs/tiny.yaml", "--output-dir", str(out), "--no-progress"]
    for setting in [*SMALL, *extra]:
        argv += ["--set", setting]
    return argv


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(run_args(out)) == 0
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("booster: warning:")]


def test_a_damaged_judge_cache_is_set_aside_once_and_rebuilt(run, capsys):
    cache = run / "judge-keyword.json"
    good = json.loads(cache.read_text())
    cut(cache)
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    [line] = warning_lines(capsys.readouterr().err)
    assert str(cache) in line and "moved it aside" in line
    assert json.loads(cache.read_text()) == good  # validated again, same numbers
    assert len(list(run.glob("judge-keyword.json.damaged-*"))) == 1
    assert "| accuracy |" in (run / "report.md").read_text()
    assert main(["report", str(run)]) == 0  # rebuilt: nothing more to say
    assert warning_lines(capsys.readouterr().err) == []


def test_a_damaged_judge_cache_does_not_stop_a_rerun(run, capsys):
    """`booster run` on a finished folder: every stage is reused and the report still gets written."""
    (run / "judge-keyword.json").write_text('{"accura')
    (run / "report.md").unlink()
    assert main(run_args(run)) == 0
    assert "| accuracy |" in (run / "report.md").read_text()


@pytest.mark.parametrize("command", ["report", "export"])
def test_a_cut_results_file_is_one_line_that_says_how_to_rebuild_it(run, capsys, command, tmp_path):
    cut(run / "results.json")
    argv = (
        ["report", str(run)]
        if command == "report"
        else ["export", str(run), str(tmp_path / "out"), "--method", "sft"]
    )
    line = one_line_error(capsys, argv)
    assert f"{run / 'results.json'}: damaged" in line and f"booster report {run} --config CONFIG" in line
    assert not (tmp_path / "out").exists()
    # and the advice works: the finished stages hold everything results.json held
    assert (
        main(["report", str(run), "--config", "configs/tiny.yaml", *sum([["--set", s] for s in SMALL], [])])
        == 0
    )
    assert len(json.loads((run / "results.json").read_text())) == 2


def test_ls_says_a_damaged_results_file_hides_the_swept_values(run, capsys):
    cut(run / "results.json")
    capsys.readouterr()
    assert main(["ls", str(run)]) == 0
    out, err = capsys.readouterr()
    [line] = warning_lines(err)
    assert f"{run / 'results.json'}: damaged" in line and "--config CONFIG" in line
    assert "2 stages: 2 done" in out  # the stages are listed all the same


def test_evaluate_sets_a_damaged_results_file_aside_and_starts_a_new_one(run, capsys):
    (run / "results.json").write_text('[{"method": "sft"')
    argv = ["evaluate", "--config", "configs/tiny.yaml", "--output-dir", str(run), "--no-progress"]
    for setting in SMALL:
        argv += ["--set", setting]
    capsys.readouterr()
    assert main(argv) == 0
    [line] = warning_lines(capsys.readouterr().err)
    assert "results.json: damaged" in line and "moved it aside" in line
    assert len(list(run.glob("results.json.damaged-*"))) == 1
    assert [r["stage"] for r in json.loads((run / "results.json").read_text())] == ["aligned", "attacked"]


def test_a_run_config_with_a_python_tag_is_refused_in_one_line_and_never_run(run, capsys, tmp_path):
    marker = tmp_path / "ran"
    (run / "config.yaml").write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    line = one_line_error(capsys, ["report", str(run)])
    assert f"{run / 'config.yaml'} line 1: not valid YAML" in line and "--config FILE" in line
    assert not marker.exists()


def test_a_damaged_file_in_an_archive_is_named_and_left_out(run, capsys, tmp_path):
    archive = tmp_path / "archive"
    archive_run(run, archive)
    [done] = list(archive.glob("attack/*/done.json"))
    cut(done)
    capsys.readouterr()
    argv = ["report", str(archive), "--config", "configs/tiny.yaml", *sum([["--set", s] for s in SMALL], [])]
    assert main(argv) == 0
    [line] = warning_lines(capsys.readouterr().err)
    assert str(done) in line and "damaged" in line and "archive the run folder again" in line
    assert [r["stage"] for r in json.loads((archive / "results.json").read_text())] == ["aligned"]
