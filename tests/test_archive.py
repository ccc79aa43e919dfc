"""`booster archive`: a run's measurements without weights or answers, from which `booster report
--config` gives the same results and paired comparisons as the run itself, grown run by run."""

from __future__ import annotations

import json

import pytest

from booster.archive import MARKER, prompt_key, verdicts_file
from booster.cli import main

ARGS = ["--config", "configs/tiny.yaml", "--set", "align.max_steps=2", "--set", "attack.max_steps=2"]
#: what results.json says of a model, compared between a run and its archive.
MEASURED = ("method", "stage", "seed", "poison_ratio", "harmful_score", "refusal_rate", "harmful_score_ci")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of the tiny grid (seed 0, then seed 1) into two folders, as two machines would."""
    base = tmp_path_factory.mktemp("archive")
    for seed in (0, 1):
        out = base / f"run{seed}"
        assert (
            main(["run", *ARGS, "--set", f"seeds=[{seed}]", "--output-dir", str(out), "--no-progress"]) == 0
        )
    return base


def files_of(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def paired_section(report: str) -> str:
    return report.split("## Paired comparison with sft")[1].split("\n## ")[0]


def test_archive_keeps_the_measurements_and_no_weights_or_text(runs, capsys):
    run, archive = runs / "run0", runs / "archive-one"
    assert main(["archive", str(run), str(archive)]) == 0
    assert "archived 4 finished stages and 4 evaluations" in capsys.readouterr().out
    kept = files_of(archive)
    assert MARKER in kept
    assert not [f for f in kept if f.endswith((".safetensors", ".bin", ".pt")) or "checkpoint" in f]
    assert not [f for f in kept if "generations-" in f]
    for stage in (run / "align").glob("*/"):
        assert f"align/{stage.name}/done.json" in kept and f"align/{stage.name}/metrics.jsonl" in kept
    # not one answer or prompt of the generations survives, only the prompts' hashes and verdicts
    generated = [
        json.loads(line) for g in run.rglob("generations-*.jsonl") for line in g.read_text().splitlines()
    ]
    text = "".join(p.read_text() for p in archive.rglob("*") if p.is_file())
    harmful = [g for g in generated if "harmful" in g]
    assert harmful and all(g["prompt"] not in text for g in harmful)
    assert all(g["answer"] not in text for g in generated if len(g["answer"]) > 3)
    rows = [
        json.loads(line) for v in archive.rglob("verdicts-*.jsonl") for line in v.read_text().splitlines()
    ]
    verdicts = [v for v in rows if "task" not in v]
    assert {v["prompt_sha256"] for v in verdicts} == {prompt_key(g["prompt"]) for g in harmful}
    assert all(set(v) == {"prompt_sha256", "harmful", "refusal", "degenerate", "score"} for v in verdicts)
    # per task question only its hash and whether it was answered right: the evaluation's FA again
    for evaluation in archive.rglob("eval-*.json"):
        kept = [json.loads(line) for line in verdicts_file(evaluation).read_text().splitlines()]
        asked = [v for v in kept if "task" in v]
        assert all(set(v) == {"task", "prompt_sha256", "correct"} for v in asked)
        fa = json.loads(evaluation.read_text())["finetune_accuracy"]
        assert asked and 100.0 * sum(v["correct"] for v in asked) / len(asked) == pytest.approx(fa)
    task_rows = [g for g in generated if "task" in g]
    assert task_rows and all(isinstance(g["correct"], bool) for g in task_rows)  # as evaluated


def test_the_report_of_an_archive_is_the_report_of_its_run(runs, capsys):
    run, archive = runs / "run0", runs / "archive-report"
    assert main(["archive", str(run), str(archive)]) == 0
    assert main(["report", str(archive), *ARGS, "--set", "seeds=[0]"]) == 0
    ours = json.loads((archive / "results.json").read_text())
    theirs = json.loads((run / "results.json").read_text())
    assert [[e[k] for k in MEASURED] for e in ours] == [[e[k] for k in MEASURED] for e in theirs]
    assert [e.get("probe_loss_drop") for e in ours] == [e.get("probe_loss_drop") for e in theirs]
    text = (archive / "report.md").read_text()
    assert "This folder is an archive" in text and "generations-" not in text
    section = paired_section(text)
    assert "| booster |" in section  # the comparison was made, from the archived verdicts
    assert "ΔFA = FA(method)" in section  # and the task's, from the archived answers' right / wrong
    assert section == paired_section((run / "report.md").read_text())


def test_archiving_a_second_run_adds_its_stages(runs, capsys):
    archive = runs / "archive-both"
    for seed in (0, 1):
        assert main(["archive", str(runs / f"run{seed}"), str(archive)]) == 0
    assert main(["report", str(archive), *ARGS, "--set", "seeds=[0,1]"]) == 0
    assert "gathered 8 of the grid's 8 models" in capsys.readouterr().out
    results = json.loads((archive / "results.json").read_text())
    assert sorted({e["seed"] for e in results}) == [0, 1]
    section = paired_section((archive / "report.md").read_text())
    assert "(1 of 2 seeds)" not in section  # both seeds' verdicts pooled
    # archiving a run again replaces its stages and leaves the other run's in place
    assert main(["archive", str(runs / "run0"), str(archive)]) == 0
    assert len(list((archive / "align").glob("*-seed0-*"))) == 2
    assert len(list((archive / "align").glob("*-seed1-*"))) == 2
    for done in (runs / "run0").glob("*/*/done.json"):
        assert (archive / done.relative_to(runs / "run0")).read_bytes() == done.read_bytes()


def test_no_stage_trains_into_an_archive(runs, capsys):
    archive = runs / "archive-guard"
    assert main(["archive", str(runs / "run0"), str(archive)]) == 0
    capsys.readouterr()
    assert main(["run", *ARGS, "--output-dir", str(archive), "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an archive" in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("case", ["not a run", "other files", "a file"])
def test_archive_refuses_bad_folders_in_one_line(runs, tmp_path, capsys, case):
    run, dest = runs / "run0", tmp_path / "dest"
    if case == "not a run":
        run = tmp_path
    elif case == "other files":
        dest.mkdir()
        (dest / "notes.txt").write_text("mine")
    else:
        dest.write_text("a file")
    assert main(["archive", str(run), str(dest)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    if case == "other files":
        assert (dest / "notes.txt").read_text() == "mine" and not (dest / MARKER).exists()


def test_an_archive_carries_its_configs_and_reports_without_one(runs, capsys):
    archive = runs / "archive-configs"
    for seed in (0, 1):
        assert main(["archive", str(runs / f"run{seed}"), str(archive)]) == 0
        assert f"its report: booster report {archive}\n" in capsys.readouterr().out
    assert main(["archive", str(runs / "run0"), str(archive)]) == 0  # the same config again: one file
    assert len(list((archive / "configs").glob("*.yaml"))) == 2
    capsys.readouterr()
    assert main(["report", str(archive)]) == 0  # seeds [0] and [1]: one grid of both
    assert "gathered 8 of the grid's 8 models" in capsys.readouterr().out
    ours = json.loads((archive / "results.json").read_text())
    theirs = [e for seed in (0, 1) for e in json.loads((runs / f"run{seed}" / "results.json").read_text())]
    key = lambda e: [e[k] for k in MEASURED]  # noqa: E731
    assert sorted(map(key, ours), key=str) == sorted(map(key, theirs), key=str)
    assert "seeds [0, 1]" in (archive / "report.md").read_text()
    # --config still chooses the grid: seed 1 alone
    assert main(["report", str(archive), *ARGS, "--set", "seeds=[1]"]) == 0
    assert "gathered 4 of the grid's 4 models" in capsys.readouterr().out


def test_archived_runs_that_differ_beyond_their_lists_ask_for_a_config(runs, tmp_path, capsys):
    archive = tmp_path / "archive"
    assert main(["archive", str(runs / "run0"), str(archive)]) == 0
    [kept] = (archive / "configs").glob("*.yaml")
    text = kept.read_text()
    assert text.count("  max_new_tokens: 8\n") == 1
    other = archive / "configs" / "other.yaml"  # answers of another length: not one grid
    other.write_text(text.replace("  max_new_tokens: 8\n", "  max_new_tokens: 16\n"))
    capsys.readouterr()
    assert main(["report", str(archive)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its runs differ in evaluate.max_new_tokens (8 in" in err[0]
    assert str(other) in err[0] and err[0].endswith("pass --config FILE to report one of them")
    assert main(["report", str(archive), *ARGS, "--set", "seeds=[0]"]) == 0


def test_a_config_written_before_a_setting_existed_merges_at_its_default(runs, tmp_path, capsys):
    """An archive that grew across versions: its older config lacks a later setting, which ran at
    its default (a null in the merged grid was refused as a value of the setting)."""
    archive = tmp_path / "archive"
    assert main(["archive", str(runs / "run0"), str(archive)]) == 0
    [kept] = (archive / "configs").glob("*.yaml")
    text = kept.read_text()
    assert text.count("  compile: false\n") == 2  # align and attack
    older = archive / "configs" / "older.yaml"
    older.write_text(text.replace("  compile: false\n", ""))
    capsys.readouterr()
    assert main(["report", str(archive)]) == 0
    assert "gathered 4 of the grid's 4 models" in capsys.readouterr().out
    assert (archive / "config.yaml").read_text().count("  compile: false\n") == 2  # not [false, null]
