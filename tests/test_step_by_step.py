"""The command line step by step: align, attack, evaluate one by one keep results.json up to date for
`booster report`; `booster ls`; readable output (named bars, short log lines, --quiet); provenance in
results.json and report.md; files readable by the group; --help and --version."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import booster
from booster.cli import build_parser, main
from booster.config import load_sweep
from booster.plan import cells

#: one swept value, so the entries and `booster ls` carry it.
ARGS = ["--config", "configs/tiny.yaml", "--set", "methods=[sft]", "--set", "attack.learning_rate=[1.0e-3]"]
ARGS += ["--set", "align.max_steps=2", "--set", "attack.max_steps=2"]
#: what `booster align` printed (stdout, stderr) with its progress bars on.
ALIGN_OUTPUT: list[str] = []


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """align (progress bars on), attack and evaluate run one by one, under umask 022."""
    root = tmp_path_factory.mktemp("steps") / "run"
    umask = os.umask(0o022)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert main(["align", *ARGS, "--output-dir", str(root)]) == 0
        assert main(["attack", *ARGS, "--output-dir", str(root), "--no-progress"]) == 0
        assert main(["evaluate", *ARGS, "--output-dir", str(root), "--no-progress"]) == 0
    finally:
        os.umask(umask)
    ALIGN_OUTPUT.extend([out.getvalue(), err.getvalue()])
    return root


def test_evaluate_adds_its_entries_and_report_works(run_dir, capsys):
    results = json.loads((run_dir / "results.json").read_text())
    assert [(r["method"], r["stage"], r["poison_ratio"]) for r in results] == [
        ("sft", "aligned", None),
        ("sft", "attacked", 0.1),
    ]
    assert all(r["sweep"] == {"attack.learning_rate": 1e-3} and r["train_steps"] == 2 for r in results)
    before = (run_dir / "results.json").read_bytes()
    assert main(["evaluate", *ARGS, "--output-dir", str(run_dir), "--no-progress"]) == 0
    assert (run_dir / "results.json").read_bytes() == before  # replaced by itself, not appended
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    assert "| sft |" in report and "lr 0.001" in report  # the settings come from evaluate's config.yaml


def test_evaluate_replaces_an_entry_and_keeps_the_others(run_dir, tmp_path):
    from booster.runs import update_results

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    results = json.loads((copy / "results.json").read_text())
    other = {**results[0], "method": "booster", "harmful_score": 12.5}
    update_results(copy, [other, {**results[1], "harmful_score": 50.0}])
    merged = json.loads((copy / "results.json").read_text())
    assert [(r["method"], r["stage"], r["harmful_score"]) for r in merged] == [
        ("sft", "aligned", results[0]["harmful_score"]),
        ("sft", "attacked", 50.0),
        ("booster", "aligned", 12.5),
    ]


def test_provenance_in_results_and_report(run_dir, capsys):
    import torch
    import transformers

    results = json.loads((run_dir / "results.json").read_text())
    aligned, attacked = (r["provenance"] for r in results)
    assert aligned["stage_dir"].startswith("align/sft-seed0-")
    assert attacked["stage_dir"].startswith("attack/sft-seed0-p0.1-")
    assert (run_dir / aligned["stage_dir"] / "done.json").is_file()
    versions = aligned["versions"]
    assert versions["booster-llm"] == booster.__version__ and versions["torch"] == torch.__version__
    assert versions["transformers"] == transformers.__version__ and versions["peft"]
    assert aligned["device"] == "cpu"
    assert aligned["precision"] == "weights float32, align float32"
    assert attacked["precision"] == "weights float32, align float32, attack float32"
    checkout = Path(booster.__file__).resolve().parents[2]
    if (checkout / ".git").exists():  # run from a source checkout, as the tests are
        assert len(aligned["git_commit"]) == 40 and isinstance(aligned["git_dirty"], bool)
    assert main(["report", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    assert "## Provenance" in report and f"- torch: `{torch.__version__}`" in report
    assert "- device: `cpu`" in report


def test_git_commit_is_absent_outside_a_checkout(monkeypatch, tmp_path):
    from booster import provenance

    provenance.git_state.cache_clear()
    monkeypatch.setattr(provenance, "__file__", str(tmp_path / "site-packages" / "booster" / "provenance.py"))
    try:
        assert provenance.git_state() == {}
    finally:
        provenance.git_state.cache_clear()


def test_files_are_readable_by_the_group(run_dir):
    unreadable = [
        str(p.relative_to(run_dir))
        for p in run_dir.rglob("*")
        if p.is_file() and (p.stat().st_mode & 0o044) != 0o044
    ]
    assert unreadable == []
    model = next(run_dir.glob("align/*/model/adapter_model.safetensors"))
    assert stat.S_IMODE(model.stat().st_mode) == 0o644  # safetensors alone writes 0600


def test_ls_lists_every_stage_with_its_state(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    partial = copy / "attack" / "sft-seed0-p0.2-0123abcd" / "checkpoints" / "checkpoint-1"
    partial.mkdir(parents=True)
    (partial / "trainer_state.json").write_text(json.dumps({"global_step": 1, "max_steps": 4}))
    (copy / "align" / "booster-seed1-89abcdef").mkdir()  # stopped before its first checkpoint
    damaged = copy / "align" / "vaccine-seed0-fedcba98"
    damaged.mkdir()
    (damaged / "done.json").write_text("{")
    capsys.readouterr()
    assert main(["ls", str(copy), "--json"]) == 0
    by_name = {os.path.basename(r["path"]): r for r in json.loads(capsys.readouterr().out)}
    [aligned] = [r for n, r in by_name.items() if n.startswith("sft-seed0-") and r["stage"] == "align"]
    assert aligned["status"] == "done" and aligned["steps"] == 2 and aligned["evaluations"] == 1
    assert (
        aligned["sweep"] == {"attack.learning_rate": 1e-3}
        and aligned["method"] == "sft"
        and aligned["seed"] == 0
    )
    attacked = next(r for n, r in by_name.items() if n.startswith("sft-seed0-p0.1-"))
    assert attacked["status"] == "done" and attacked["poison_ratio"] == 0.1
    partial = by_name["sft-seed0-p0.2-0123abcd"]
    assert (partial["status"], partial["steps"], partial["max_steps"], partial["poison_ratio"]) == (
        "partial",
        1,
        4,
        0.2,
    )
    assert partial["sweep"] is None and by_name["booster-seed1-89abcdef"]["steps"] is None
    assert (
        by_name["booster-seed1-89abcdef"]["status"] == "failed"
        and by_name["booster-seed1-89abcdef"]["seed"] == 1
    )
    assert by_name["vaccine-seed0-fedcba98"]["status"] == "damaged"
    assert main(["ls", str(copy)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["stage", "method", "seed", "p", "swept", "status", "steps", "evals", "path"]
    assert any("learning_rate=0.001" in line and " done " in line for line in table)
    assert "5 stages: 2 done, 1 partial, 1 failed, 1 damaged" in table
    assert main(["ls", str(tmp_path / "nowhere")]) == 2
    assert "no align/ or attack/ stage folders here" in capsys.readouterr().err


def test_ls_tells_apart_two_attacks_that_differ_in_a_setting_from_their_config(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    # one attack more, step by step: a learning rate and a size that results.json does not sweep
    other = ["--set", "attack.learning_rate=5.0e-4", "--set", "attack.samples=16", "--set", "attack.epochs=3"]
    assert main(["attack", *ARGS, *other, "--output-dir", str(copy), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["ls", str(copy), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    attacks = sorted(
        (r for r in rows if r["stage"] == "attack"), key=lambda r: r["sweep"]["attack.learning_rate"]
    )
    assert [r["sweep"] for r in attacks] == [
        {"attack.learning_rate": 5e-4, "attack.samples": 16, "attack.epochs": 3},
        {"attack.learning_rate": 1e-3, "attack.samples": 20, "attack.epochs": 20},
    ]
    assert all(type(r["sweep"]["attack.epochs"]) is int for r in attacks)  # epochs is a float setting
    [aligned] = [r for r in rows if r["stage"] == "align"]
    assert aligned["sweep"] == {"attack.learning_rate": 1e-3}  # one alignment: nothing tells it apart
    assert main(["ls", str(copy)]) == 0
    table = capsys.readouterr().out
    assert "samples=16, learning_rate=0.0005, epochs=3 " in table  # the config's order in every row
    assert "samples=20, learning_rate=0.001, epochs=20 " in table and "epochs=20.0" not in table


def test_ls_survives_a_reader_that_closes_the_pipe(run_dir):
    """`booster ls --json | head`: the reader goes away; booster stops quietly, no traceback."""
    command = f"{sys.executable} -m booster ls {run_dir} --json | true"  # gone before booster writes
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
    )  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, (
        done.stderr
    )


def test_progress_bars_are_named_and_trainer_logs_are_short_lines(run_dir):
    out, err = ALIGN_OUTPUT
    assert "align sft seed 0:" in err  # the stage's bar
    assert "align sft seed 0 step 2/2: loss " in out and " lr " in out  # one short line per log step
    assert "{'loss'" not in out + err and "'train_runtime'" not in out + err  # no raw Trainer dicts
    assert out.count("align sft seed 0 learning_rate=0.001: done in") == 1


def test_quiet_leaves_only_results(run_dir, capsys):
    capsys.readouterr()
    assert main(["--quiet", "evaluate", *ARGS, "--output-dir", str(run_dir)]) == 0
    quiet = capsys.readouterr()
    assert main(["evaluate", *ARGS, "--output-dir", str(run_dir), "--no-progress"]) == 0
    loud = capsys.readouterr()
    assert loud.out.count("evaluate sft seed 0") == 2  # one line per model (the handler is set up once)
    assert "evaluate sft seed 0" not in quiet.out + quiet.err and "content warning" in quiet.out
    assert main(["evaluate", *ARGS, "--output-dir", str(run_dir), "--quiet"]) == 0  # after the command too
    assert "evaluate sft seed 0" not in capsys.readouterr().out


def test_compact_log_line():
    from booster.progress import compact_line

    logs = {
        "loss": 2.34567,
        "grad_norm": 1.0,
        "learning_rate": 5e-4,
        "epoch": 0.5,
        "harmful_loss_reduction": 0.0123,
    }
    assert compact_line("align booster seed 0", 10, 50, logs) == (
        "align booster seed 0 step 10/50: loss 2.346  h(w)-h(w') 0.0123  grad norm 1  lr 5.00e-04"
    )
    assert compact_line("align booster seed 0", 50, 50, {"train_runtime": 3.2, "train_loss": 2.0}) is None


def test_pipeline_eta_weighs_stages_by_passes_times_steps():
    from tqdm import tqdm

    from booster.plan import cell_weights
    from booster.progress import advance

    grid = cells(load_sweep("configs/tiny.yaml", ["align.gradient_accumulation_steps=2"]))
    assert [c.method for c in grid] == ["sft", "booster"]
    # 4 alignment steps x 2 micro-batches x passes (sft 1, booster 3); an attack: 4 steps, 1 pass
    assert cell_weights(grid) == [(8, 4), (24, 4)]
    # "all" samples on local data: the rows the file holds (12, batch 4 -> 3 steps an epoch)
    every = cells(load_sweep("configs/tiny.yaml", ["align.max_steps=-1", "align.alignment_samples=null"]))
    epochs = every[0].config.align.epochs
    assert cell_weights(every) == [(epochs * 3, 4), (epochs * 3 * 3, 4)]
    # on the hub the size stays unknown offline: such a stage weighs the mean known one of its kind
    hub = ["align.max_steps=-1", "align.alignment_samples=null", "align.alignment_data=someone/refusals"]
    unknown = cells(load_sweep("configs/tiny.yaml", hub))
    assert cell_weights(unknown)[0][0] == cell_weights(unknown)[1][0] == 1
    bar = tqdm(total=40, file=io.StringIO())
    advance(bar, 24, reused=True)
    advance(bar, 8, reused=False)
    assert (bar.n, bar.total) == (8, 16)


def test_help_has_an_example_per_command_and_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"booster-llm {booster.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "hardens a language model against harmful fine-tuning" in text
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in commands:
        assert f"\n  booster {name} " in text, name
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert f"example:\n  booster {name} " in capsys.readouterr().out, name


@pytest.mark.parametrize("flag", ["--quiet", "--no-progress"])
def test_quiet_flags_also_hide_the_libraries_own_bars(flag, run_dir, tmp_path):
    """transformers' "Loading weights" and the hub's download bars follow --quiet / --no-progress."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    argv = ["report", str(run_dir), flag] if flag == "--quiet" else ["dry-run-free"]
    try:
        if flag == "--quiet":
            assert main(argv) == 0
        else:
            out = tmp_path / "out"
            assert main(["align", "--config", "configs/tiny.yaml", "--output-dir", str(out), flag,
                         "--set", "align.max_steps=1"]) == 0  # fmt: skip
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    finally:
        hf_logging.enable_progress_bar()
        enable_progress_bars()
