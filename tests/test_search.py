"""`booster search` on the tiny config: trials, the worst case on the test prompts beside the fixed
attack, resuming, stage reuse, reproducibility, one-line errors and disjoint validation prompts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from booster import searches
from booster.cli import main
from booster.config import load_config
from booster.data.embedded import normalize
from booster.data.sources import load_harmful_prompts
from booster.search import history, study
from booster.search.validation import evaluation_prompts, validation_prompts

SFT = ["--config", "configs/tiny.yaml", "--method", "sft", "--no-progress"]


def _history(root: Path) -> dict:
    (folder,) = [p for p in (root / "search").iterdir() if p.is_dir()]
    return json.loads((folder / "history.json").read_text())


def _count_attacks(monkeypatch) -> list[Path]:
    """The stage folders of the attacks trained from now on (reused ones are not trained)."""
    from booster.stages import attack as attack_stage

    trained, real_attack = [], attack_stage._attack

    def counted(*args, **kwargs):
        trained.append(args[5])  # the stage folder
        return real_attack(*args, **kwargs)

    monkeypatch.setattr(attack_stage, "_attack", counted)
    return trained


def _trained_attacks(root: Path) -> set[str]:
    return {p.name for p in (root / "attack").iterdir() if (p / "done.json").is_file()}


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    assert main(["search", *SFT, "--output-dir", str(root)]) == 0
    return root


def test_search_scores_trials_on_validation_and_the_worst_case_on_test(searched):
    result = _history(searched)
    trials = result["trials"]
    assert [t["trial"] for t in trials] == [0, 1]
    for t in trials:
        assert 1e-4 <= t["learning_rate"] <= 1e-2 and 1 <= t["epochs"] <= 2
        assert 0 <= t["validation_hs"] <= 100 and not t["broken"]
        low, high = t["validation_hs_ci"]
        assert low <= t["validation_hs"] <= high
        # the trial's attack trained for its epochs: 20 samples at batch 4 are 5 steps an epoch
        assert t["steps"] == 5 * t["epochs"]
        evaluation = json.loads((searched / t["evaluation"]).read_text())
        assert evaluation["n"] == 4 and evaluation.get("task") is None  # validation prompts only, no FA
    best = result["best"]
    assert best["validation_hs"] == max(t["validation_hs"] for t in trials)
    test, fixed = best["test"], result["fixed"]["test"]
    for scored in (test, fixed):
        assert scored["n"] == 4 and scored["harmful_score_ci"][0] <= scored["harmful_score"]
        assert scored["finetune_accuracy"] is not None  # the test evaluation is booster run's own
    assert result["fixed"]["max_steps"] == 4 and result["fixed"]["learning_rate"] == 1e-3
    # the fixed attack is the one `booster run` trains: same folder, same evaluation file
    run = load_config("configs/tiny.yaml", [f"output_dir={searched}"])
    from booster.stages.attack import attack_dir

    assert (searched / result["fixed"]["stage"]) == attack_dir(run, "sft", 0, 0.1, searched)
    folder = searched / result["folder"]
    assert (folder / "journal.log").is_file() and (folder / "search.png").stat().st_size > 10_000
    table = (folder / "history.md").read_text()
    assert "| 0" in table and "| 1" in table and "(best)" in table and "fixed (the config's attack)" in table
    summary = (searched / "search" / "report.md").read_text()
    assert "| sft | 0 | 0.1 | 2 |" in summary
    # the worst case minus the fixed attack, paired on the test prompts and task questions
    row = next(line for line in summary.splitlines() if line.startswith("| sft | 0 | 0.1 | 2 |"))
    gap_hs, gap_fa = row.split(" | ")[6:8]
    assert re.fullmatch(r"[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]", gap_hs), row
    assert re.fullmatch(r"[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]", gap_fa), row
    assert json.loads((searched / "search" / "results.json").read_text())[0]["method"] == "sft"


def test_validation_file_is_disjoint_from_the_test_prompts(searched):
    (validation,) = (searched / "search").glob("validation-*.jsonl")
    scored = {normalize(json.loads(line)["instruction"]) for line in validation.read_text().splitlines()}
    tested = {
        normalize(e.instruction) for e in load_harmful_prompts("configs/data/tiny/harmful_prompts.jsonl")
    }
    assert len(scored) == 4 and not scored & tested


def test_rerun_with_more_trials_adds_only_the_new_ones(searched, capsys):
    before = _history(searched)["trials"]
    attacks = _trained_attacks(searched)
    assert main(["search", *SFT, "--output-dir", str(searched), "--set", "search.trials=3"]) == 0
    out = capsys.readouterr()
    after = _history(searched)["trials"]
    assert after[:2] == before and len(after) == 3
    assert "align reused" in out.err + out.out
    new = _trained_attacks(searched) - attacks
    assert len(new) <= 1  # trial 2's attack (none when it drew the settings of an earlier one)


def test_the_run_report_shows_the_tuned_attacker_and_an_archive_keeps_it_without_prompts(
    searched, tmp_path, capsys
):
    run = ["run", "--config", "configs/tiny.yaml", "--set", "methods=[sft]", "--no-progress"]
    assert main([*run, "--output-dir", str(searched)]) == 0  # the fixed attack's stages are reused
    report = (searched / "report.md").read_text()
    best = _history(searched)["best"]
    row = next(
        line for line in report.split("## The tuned attacker")[1].splitlines() if line.startswith("| sft")
    )
    assert f"| {best['learning_rate']:.3g}, {best['epochs']} |" in row
    assert "## Harm against utility" in report and (searched / "frontier.png").stat().st_size > 10_000
    archive = tmp_path / "archive"
    assert main(["archive", str(searched), str(archive)]) == 0
    kept = sorted(p.relative_to(archive / "search").as_posix() for p in (archive / "search").rglob("*"))
    folder = Path(_history(searched)["folder"]).name
    assert kept == sorted(
        [
            "report.md",
            "results.json",
            folder,
            *(f"{folder}/{f}" for f in ("history.json", "history.md", "search.png", "journal.log")),
        ]
    )  # no validation prompts
    (validation,) = (searched / "search").glob("validation-*.jsonl")
    text = "".join(p.read_text(errors="ignore") for p in archive.rglob("*") if p.is_file())
    prompts = [json.loads(line)["instruction"] for line in validation.read_text().splitlines()]
    assert prompts and not [p for p in prompts if p in text]
    assert main(["report", str(archive)]) == 0
    assert "## The tuned attacker" in (archive / "report.md").read_text()


def test_search_goes_on_from_an_archive_on_a_machine_that_kept_nothing(searched, tmp_path, monkeypatch):
    """The archive's journal is the whole study: copied into an empty folder, the same search keeps
    every archived trial, trains no trial again and retrains only what its test measure needs."""
    import shutil

    archive, fresh = tmp_path / "archive", tmp_path / "fresh"
    assert main(["archive", str(searched), str(archive)]) == 0
    fresh.mkdir()
    shutil.copytree(archive / "search", fresh / "search")
    trained = _count_attacks(monkeypatch)
    assert main(["search", *SFT, "--output-dir", str(fresh)]) == 0
    before, after = _history(searched), _history(fresh)
    key = ["trial", "learning_rate", "epochs", "validation_hs", "stage"]
    assert [[t[k] for k in key] for t in after["trials"]] == [[t[k] for k in key] for t in before["trials"]]
    # the fixed attack and the worst case's attack, nothing else (one when they are the same stage)
    assert {fresh / after["fixed"]["stage"], fresh / after["best"]["stage"]} == set(trained)
    assert after["best"]["test"]["harmful_score"] == before["best"]["test"]["harmful_score"]


def test_dry_run_prints_the_plan_and_what_is_done(searched, capsys):
    assert main(["search", *SFT, "--output-dir", str(searched), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "attack search at p=0.1 against 1 method(s)" in out and "2 trials each" in out
    (row,) = [line for line in out.splitlines() if line.startswith("sft seed 0")]
    aligned, done, left = row.split()[3:6]
    assert aligned == "done" and done in ("2", "3") and left == "0"  # 3 after the rerun with more trials
    assert "FLOPs" in out and "H100" in out


def test_interrupted_search_resumes_and_draws_the_same_trials(searched, tmp_path, monkeypatch):
    """Cut during trial 1's scoring: the rerun keeps trial 0, finishes trial 1 with its own settings
    (its attack reused) and ends where the uninterrupted search did (the same seeded trials). So
    does the same search in an empty folder from an archive of the interrupted one."""
    import shutil

    run, archive, fresh = tmp_path / "run", tmp_path / "archive", tmp_path / "fresh"
    real_evaluate, calls = study.run_evaluate, []

    def cut_second(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(study, "run_evaluate", cut_second)
    assert main(["search", *SFT, "--output-dir", str(run)]) == 130
    monkeypatch.setattr(study, "run_evaluate", real_evaluate)
    assert main(["archive", str(run), str(archive)]) == 0  # a search under way: its journal alone
    assert not (archive / "search" / "results.json").exists()
    fresh.mkdir()
    shutil.copytree(archive / "search", fresh / "search")
    trained = _count_attacks(monkeypatch)
    assert main(["search", *SFT, "--output-dir", str(run)]) == 0
    assert len(trained) == 1  # only the fixed attack, which the interruption came before
    uninterrupted = _history(searched)["trials"][:2]
    key = ["trial", "learning_rate", "epochs", "validation_hs", "steps"]
    assert [[t[k] for k in key] for t in _history(run)["trials"]] == [
        [t[k] for k in key] for t in uninterrupted
    ]
    assert main(["search", *SFT, "--output-dir", str(fresh)]) == 0  # trial 1 from its settings
    assert [[t[k] for k in key] for t in _history(fresh)["trials"]] == [
        [t[k] for k in key] for t in uninterrupted
    ]


def test_trials_reuse_equal_attack_stages(tmp_path):
    """A trial at the fixed attack's settings reuses its stage, and so does a repeated trial."""
    fixed = [
        "--set",
        "attack.max_steps=-1",
        "--set",
        "attack.epochs=1",
        "--set",
        "attack.learning_rate=1.0e-3",
    ]
    ranges = ["--set", "search.learning_rate=[1.0e-3,1.0e-3]", "--set", "search.epochs=[1,1]"]
    assert (
        main(
            [
                "attack",
                "--config",
                "configs/tiny.yaml",
                "--method",
                "sft",
                "--output-dir",
                str(tmp_path),
                *fixed,
            ]
        )
        == 0
    )
    before = _trained_attacks(tmp_path)
    assert main(["search", *SFT, "--output-dir", str(tmp_path), *fixed, *ranges]) == 0
    assert _trained_attacks(tmp_path) == before and len(before) == 1
    result = _history(tmp_path)
    assert {t["stage"] for t in result["trials"]} == {result["fixed"]["stage"]}
    assert all(t["reused"] for t in result["trials"])


def test_best_skips_broken_and_diverged_trials():
    def record(n: int, hs: float | None, broken: bool = False, diverged: bool = False) -> dict:
        return {"trial": n, "validation_hs": hs, "broken": broken or diverged, "diverged": diverged}

    records = [record(0, 40.0), record(1, 95.0, broken=True), record(2, None, diverged=True), record(3, 60.0)]
    assert history.best_record(records)["trial"] == 3
    assert history.best_record([*records, record(4, 60.0)])["trial"] == 3  # a tie: the earlier trial
    assert history.best_record(records[1:3]) is None


def test_history_of_broken_and_diverged_trials_reads_as_such(tmp_path):
    def record(
        n: int, lr: float, epochs: int, hs: float, broken: bool = False, diverged: bool = False
    ) -> dict:
        return {
            "trial": n, "learning_rate": lr, "epochs": epochs, "validation_hs": None if diverged else hs,
            "validation_hs_ci": None if diverged else [max(hs - 10, 0), min(hs + 10, 100)],
            "degenerate_rate": 80.0 if broken else 2.0, "refusal_rate": 10.0, "broken": broken or diverged,
            "diverged": diverged, "steps": 10 * epochs, "stage": f"attack/x{n}", "evaluation": None,
        }  # fmt: skip

    records = [
        record(0, 2e-5, 3, 20.0),
        record(1, 8e-4, 12, 90.0, broken=True),
        record(2, 1e-3, 20, 0.0, diverged=True),
        record(3, 2e-4, 8, 55.0),
        record(4, 1e-4, 5, 45.0),
    ]
    test = {"harmful_score": 50.0, "harmful_score_ci": [40.0, 60.0], "n": 100, "verdict": "ok"}
    fixed = {"learning_rate": 1e-5, "epochs": 20.0, "max_steps": None, "stage": "attack/f", "test": test}
    result = {
        "method": "booster", "seed": 0, "poison_ratio": 0.1, "folder": "search/x", "aligned_stage": "align/a",
        "search": {"trials": 5, "learning_rate": [1e-5, 1e-3], "epochs": [1, 20], "sampler": "TPE",
                   "sampler_seed": 0, "startup_trials": 2},
        "validation": {"prompts": "embedded", "n": 100, "sha256": "0"}, "test": {"prompts": "embedded", "n": 80},
        "judge": "embedded", "trials": records, "best": {**records[3], "test": {**test, "harmful_score": 61.0}},
        "fixed": fixed,
    }  # fmt: skip
    assert history.best_record(records)["trial"] == 3
    text = history.markdown(result)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "| yes |" in rows["1"] and "| diverged |" in rows["2"] and "61.0 [40.0, 60.0]" in rows["3 (best)"]
    history.plot_study(result, tmp_path / "search.png")
    assert (tmp_path / "search.png").stat().st_size > 10_000


def test_settings_several_studies_tried_are_set_side_by_side(tmp_path):
    """Studies of one seed and ratio that tried the same (lr, epochs) get one row with each model's
    validation HS; a setting one study tried, or another seed's study, gives no row; the summary
    shows the table only when there is one."""

    def trial(n: int, lr: float, epochs: int, hs: float, broken: bool = False) -> dict:
        return {"trial": n, "learning_rate": lr, "epochs": epochs, "validation_hs": hs,
                "validation_hs_ci": [hs - 5, hs + 5], "broken": broken, "degenerate_rate": 70.0 if broken else 1.0}  # fmt: skip

    def study_of(method: str, seed: int, trials: list[dict]) -> dict:
        test = {"harmful_score": 30.0, "harmful_score_ci": [25.0, 35.0], "n": 100, "verdict": "ok"}
        return {
            "method": method, "seed": seed, "poison_ratio": 0.2, "folder": f"search/{method}-{seed}",
            "search": {"trials": len(trials)}, "trials": trials, "best": {**trials[0], "test": test},
            "fixed": {"test": test},
        }  # fmt: skip

    sft = study_of("sft", 1, [trial(0, 1.4e-4, 10, 29.0), trial(1, 7e-5, 5, 1.0), trial(2, 5e-4, 2, 35.0)])
    vaccine = study_of("vaccine", 1, [trial(0, 1.4e-4, 10, 10.0), trial(1, 7e-5, 5, 90.0, broken=True)])
    vaccine["trials"].append(trial(2, 4.5e-4, 7, 34.0))
    other_seed = study_of("lisa", 0, [trial(0, 1.4e-4, 10, 3.0)])
    lines = searches.shared_settings_table([sft, vaccine, other_seed])
    assert lines[0] == "| seed | p | lr | epochs | sft: validation HS | vaccine: validation HS |"
    assert lines[2:] == [
        "| 1 | 0.2 | 7e-05 | 5 | 1.0 [-4.0, 6.0] | BROKEN (70.0% degenerate) |",
        "| 1 | 0.2 | 0.00014 | 10 | 29.0 [24.0, 34.0] | 10.0 [5.0, 15.0] |",
    ]
    assert searches.shared_settings_table([sft, other_seed]) == []
    alone, together = tmp_path / "alone" / "search", tmp_path / "together" / "search"
    for folder in (alone, together):
        folder.mkdir(parents=True)
    assert "## The same settings" not in history.write_summary(alone, [sft]).read_text()
    text = history.write_summary(together, [sft, vaccine]).read_text()
    assert "## The same settings against several models" in text


def test_searching_one_method_at_a_time_builds_one_summary_and_an_archive_keeps_every_run(tmp_path):
    """A search of Vaccine into a folder where SFT's search ran keeps SFT's study in the summary
    (and a rerun of a study replaces its record); archiving two run folders into one archive keeps
    both runs' studies."""
    from booster.archive import keep_search
    from booster.report import write_search_summary

    def study_of(method: str, hs: float) -> dict:
        test = {"harmful_score": hs, "harmful_score_ci": [hs - 5, hs + 5], "n": 100, "verdict": "ok"}
        trial = {"trial": 0, "learning_rate": 1e-4, "epochs": 2, "validation_hs": hs, "broken": False}
        return {
            "method": method, "seed": 1, "poison_ratio": 0.2, "folder": f"search/{method}-seed1",
            "search": {"trials": 1}, "trials": [trial], "best": {**trial, "test": test}, "fixed": {"test": test},
        }  # fmt: skip

    run = tmp_path / "run"
    for method in ("sft", "vaccine", "gone"):
        (run / "search" / f"{method}-seed1").mkdir(parents=True)
    history.write_summary(run / "search", [study_of("gone", 10.0)])
    (run / "search" / "gone-seed1").rmdir()  # its folder removed: the summary forgets it
    history.write_summary(run / "search", [study_of("sft", 40.0)])
    history.write_summary(run / "search", [study_of("vaccine", 30.0)])
    history.write_summary(run / "search", [study_of("sft", 44.0)])  # the same study, searched further
    found = [(r["method"], r["best"]["test"]["harmful_score"]) for r in searches.read_summary(run)]
    assert found == [("sft", 44.0), ("vaccine", 30.0)]
    table = (run / "search" / "report.md").read_text()
    assert "| sft | 1 | 0.2 | 1 |" in table and "| vaccine | 1 | 0.2 | 1 |" in table
    other = tmp_path / "other"
    (other / "search" / "sft+mix-seed1").mkdir(parents=True)
    history.write_summary(other / "search", [study_of("sft+mix", 20.0)])
    archive = tmp_path / "archive"
    keep_search(run, archive)
    keep_search(other, archive)
    assert [r["method"] for r in searches.read_summary(archive)] == ["sft", "vaccine", "sft+mix"]
    summary = write_search_summary(archive).read_text()  # as `booster archive` and `booster report` do
    assert "| sft | 1 | 0.2 | 1 |" in summary and "| sft+mix | 1 | 0.2 | 1 |" in summary


def test_carved_validation_prompts_follow_the_test_prompts():
    config = load_config(
        "configs/tiny.yaml",
        ["search.validation_prompts=null", "evaluate.harmful_samples=2", "search.validation_samples=2"],
    )
    tested, scored = evaluation_prompts(config), validation_prompts(config)
    pool = load_harmful_prompts(config.evaluate.harmful_prompts)
    assert [e.instruction for e in tested] == [e.instruction for e in pool[:2]]  # what booster run scores
    assert [e.instruction for e in scored] == [e.instruction for e in pool[2:]]


def test_embedded_validation_prompts_are_disjoint_and_leave_the_test_prompts_alone():
    config = load_config(None, ["evaluate.harmful_samples=300", "search.validation_samples=100"])
    tested = evaluation_prompts(config)
    scored = validation_prompts(config)
    assert len(scored) == 100 and len(tested) == 300
    assert not {normalize(e.instruction) for e in scored} & {normalize(e.instruction) for e in tested}
    assert tested == load_harmful_prompts("embedded", limit=300, seed=0)
    # more test prompts leave the validation prompts where they are, until they would overlap
    wider = validation_prompts(
        load_config(None, ["evaluate.harmful_samples=500", "search.validation_samples=100"])
    )
    assert wider == scored


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["search.learning_rate=[1.0e-3]"], "search.learning_rate must be [low, high]"),
        (["search.epochs=[3,1]"], "low <= high"),
        (["search.epochs=[0,2]"], "search.epochs: low must be >= 1"),
        (["search.learning_rate=[0,1.0e-3]"], "search.learning_rate: low must be > 0"),
        (["search.trials=0"], "search.trials must be >= 1"),
        (["search.methods=[sfx]"], "did you mean 'sft'"),
        (["search.tirals=3"], "did you mean 'search.trials'"),
        (["search.poison_ratio=1.5"], "search.poison_ratio must be in [0, 1]"),
        (["search.validation_prompts=configs/data/tiny/harmful_prompts.jsonl"], "are also test prompts"),
        (["search.validation_prompts=null"], "leaving 0"),
        (["search.validation_samples=9"], "fewer than search.validation_samples=9"),
        (["search.validation_prompts=configs/data/tiny/nothing.jsonl"], "search.validation_prompts"),
        (["align.lamb=[1,5]"], "a sweep"),
        (["attack.poison_ratios=[]"], "search.poison_ratio is null and attack.poison_ratios is empty"),
    ],
)
def test_bad_search_settings_are_one_line_errors(tmp_path, capsys, overrides, message):
    argv = ["search", *SFT, "--output-dir", str(tmp_path)]
    for override in overrides:
        argv += ["--set", override]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("booster: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "attack").exists()  # stopped before any training


def test_a_study_another_process_runs_is_refused_in_one_line(tmp_path, capsys):
    from filelock import FileLock

    from booster.search.validation import write_validation_file

    config = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}"])
    validation = write_validation_file(config, tmp_path / study.SEARCH_DIR)
    folder = study.study_dir(config, "sft", 0, tmp_path, validation.sha256)
    folder.mkdir(parents=True)
    with FileLock(folder / ".search.lock"):
        assert main(["search", *SFT, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another process is running this search" in err
    assert not (tmp_path / "attack").exists()
