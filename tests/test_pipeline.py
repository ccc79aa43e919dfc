"""`booster run` end to end on the tiny config: entries, reuse, byte-identical results, resume."""

from __future__ import annotations

import json

import pytest

from booster.cli import main
from booster.config import load_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-run")
    assert main(["run", "--config", "configs/tiny.yaml", "--output-dir", str(out), "--no-progress"]) == 0
    return out


def test_run_writes_results_report_and_plots(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    keys = {"method", "stage", "seed", "poison_ratio", "harmful_score", "finetune_accuracy"}
    assert all(keys <= set(r) for r in results)
    cells = {(r["method"], r["stage"], r["poison_ratio"]) for r in results}
    assert cells == {
        ("sft", "aligned", None),
        ("sft", "attacked", 0.1),
        ("booster", "aligned", None),
        ("booster", "attacked", 0.1),
    }
    for r in results:
        assert 0 <= r["harmful_score"] <= 100 and 0 <= r["finetune_accuracy"] <= 100
    report = (tiny_run / "report.md").read_text()
    assert "| sft |" in report and "| booster |" in report and "Judge" in report
    assert (tiny_run / "harmful_score.png").stat().st_size > 1000
    assert (tiny_run / "finetune_accuracy.png").stat().st_size > 1000


def test_rerun_reuses_every_stage_and_is_byte_identical(tiny_run, capsys):
    before = (tiny_run / "results.json").read_bytes()
    assert main(["run", "--config", "configs/tiny.yaml", "--output-dir", str(tiny_run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("reused") >= 8 and " done (" not in out
    assert (tiny_run / "results.json").read_bytes() == before


def test_report_rebuilds_from_results(tiny_run):
    (tiny_run / "report.md").unlink()
    assert main(["report", str(tiny_run)]) == 0
    assert "| booster |" in (tiny_run / "report.md").read_text()


def test_interrupted_alignment_resumes_from_checkpoint(tmp_path, monkeypatch):
    from booster.stages import align as align_stage
    from booster.stages.common import JsonlMetrics

    config = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", "methods=[booster]"])

    def interrupt(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(JsonlMetrics, "on_step_end", interrupt, raising=False)
    with pytest.raises(KeyboardInterrupt):
        align_stage.run_align(config, "booster", 0, progress=False)
    stage = align_stage.align_dir(config, "booster", 0)
    assert (stage / "checkpoints" / "checkpoint-2").is_dir() and not (stage / "done.json").exists()

    monkeypatch.undo()
    result = align_stage.run_align(config, "booster", 0, progress=False)
    assert not result.reused
    assert result.info["resumed_from"] == "checkpoints/checkpoint-2" and result.info["steps"] == 4
    assert result.info["trained_steps"] == 2  # its speed is over the steps this run trained
    assert (stage / "model" / "adapter_model.safetensors").exists()


def test_report_with_the_config_gathers_what_a_running_grid_has_finished(tmp_path, capsys):
    from booster.config import load_config
    from booster.pipeline import run_pipeline

    settings = [f"output_dir={tmp_path}", "methods=[sft]", "attack.poison_ratios=[0.1, 0.2]"]
    run_pipeline(load_config("configs/tiny.yaml", settings), progress=False, log=lambda *_: None)
    unfinished = next((tmp_path / "attack").glob("sft-seed0-p0.2-*"))
    (unfinished / "done.json").unlink()  # as if its attack were still training
    (tmp_path / "results.json").unlink()
    capsys.readouterr()

    grid = ["--set", "methods=[sft, booster]", "--set", "attack.poison_ratios=[0.1, 0.2]"]
    assert main(["report", str(tmp_path), "--config", "configs/tiny.yaml", *grid]) == 0
    assert "gathered 2 of the grid's 6 models" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["stage"], r["poison_ratio"]) for r in results] == [
        ("sft", "aligned", None),
        ("sft", "attacked", 0.1),
    ]
    assert "| sft |" in (tmp_path / "report.md").read_text()
    assert not list((tmp_path / "align").glob("booster-*"))  # nothing was trained
