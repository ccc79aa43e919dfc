"""Several processes on one output folder: concurrent `booster run`s and `--shard I/N` workers train
every stage once and write the results of one run; a busy cell is put off; the GGUF cache is
converted once."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

from booster.cli import main
from booster.config import load_sweep
from booster.pipeline import parse_shard
from booster.plan import cells
from booster.stages.align import align_dir
from booster.stages.attack import attack_dir
from booster.storage import LOCK

SRC = str(Path(__file__).resolve().parents[1] / "src")
# Two methods x two attack learning rates: four cells, two alignments each shared by two cells.
SETS = [
    "attack.learning_rate=[1.0e-3, 2.0e-3]",
    "align.max_steps=2",
    "attack.max_steps=2",
    "evaluate.harmful_samples=2",
    "evaluate.task_samples=2",
]
TIMING = {"eval_seconds", "train_seconds", "train_seconds_per_step"}


def booster(out: Path, *extra: str) -> subprocess.Popen:
    """`booster run` on the tiny grid in a fresh process (one torch thread each: the CPUs are shared)."""
    argv = [sys.executable, "-m", "booster", "run", "--config", "configs/tiny.yaml", "--output-dir", str(out)]
    argv += ["--no-progress", *(x for s in SETS for x in ("--set", s)), *extra]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(*procs: subprocess.Popen) -> list[str]:
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out
    return outputs


def results(out: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in TIMING}
        for r in json.loads((out / "results.json").read_text())
    ]


def trained(outputs: list[str]) -> list[str]:
    """The stages the processes trained, from their log lines (`[sft seed 0 ...] align done (3s)`)."""
    found = []
    for out in outputs:
        for line in out.splitlines():
            if match := re.match(r"\[(\S+) seed 0 learning_rate=(\S+?)( p=\S+)?\] (align|attack) done", line):
                method, rate, _, stage = match.groups()
                found.append(f"{stage} {method}" if stage == "align" else f"{stage} {method} {rate}")
    return sorted(found)


EVERY_STAGE = sorted(
    ["align sft", "align booster"]
    + [f"attack {m} {r}" for m in ("sft", "booster") for r in ("0.001", "0.002")]
)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The grid run by one process: what several processes together must produce."""
    out = tmp_path_factory.mktemp("single")
    [log] = finish(booster(out))
    assert trained([log]) == EVERY_STAGE
    return out


def test_two_concurrent_runs_train_every_stage_once_and_write_one_runs_results(single, tmp_path):
    first = booster(tmp_path)
    time.sleep(1.5)
    second = booster(tmp_path)
    outputs = finish(first, second)
    assert trained(outputs) == EVERY_STAGE  # each stage once, by one of the two
    assert results(tmp_path) == results(single)
    assert not list(tmp_path.glob("*/*.damaged-*")) and not list(tmp_path.glob("*/*/*.tmp"))


def test_two_shards_split_the_grid_and_a_final_run_reuses_everything(single, tmp_path, capsys):
    zero = booster(tmp_path, "--shard", "0/2")
    one = booster(tmp_path, "--shard", "1/2")
    outputs = finish(zero, one)
    assert all("shard" in out and "2 of 4 cells" in out for out in outputs)
    assert trained(outputs) == EVERY_STAGE
    # each shard trained its own attacks; the shared alignments were trained by whichever came first
    assert all("learning_rate=0.001 p=0.1] attack done" not in line for line in outputs[1].splitlines())
    assert results(tmp_path) == results(single)  # the shard that finished last gathered both

    argv = ["run", "--config", "configs/tiny.yaml", "--output-dir", str(tmp_path), "--no-progress"]
    assert main([*argv, *(x for s in SETS for x in ("--set", s))]) == 0
    out = capsys.readouterr().out
    assert " done (" not in out and out.count("reused") == 16
    assert results(tmp_path) == results(single)


def test_a_cell_whose_stage_is_busy_is_put_off_until_the_others_are_done(tmp_path):
    grid = cells(load_sweep("configs/tiny.yaml", [*SETS, f"output_dir={tmp_path}"]))
    sft_align = align_dir(grid[0].config, "sft", 0)
    booster_attacks = [attack_dir(c.config, c.method, 0, 0.1) for c in grid if c.method == "booster"]
    sft_align.mkdir(parents=True)
    with FileLock(sft_align / LOCK):  # as if another process were aligning sft
        proc = booster(tmp_path)
        deadline = time.time() + 600
        while not all((stage / "done.json").exists() for stage in booster_attacks):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
            time.sleep(0.5)
        assert not (sft_align / "done.json").exists()
    [out] = finish(proc)
    lines = out.splitlines()
    busy = f"{sft_align.name} is busy in another process; coming back to it"
    assert f"[sft seed 0 learning_rate=0.001] {busy}" in lines
    assert f"[sft seed 0 learning_rate=0.002] {busy}" in lines
    done = [line for line in lines if " done (" in line]
    assert [line.startswith("[booster") for line in done] == [True] * 3 + [False] * 3
    assert trained([out]) == EVERY_STAGE


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "-1/2", "0/0", "1/2/3"])
def test_shard_must_be_i_of_n(text, capsys):
    argv = ["run", "--config", "configs/tiny.yaml", f"--shard={text}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"booster: error: --shard '{text}'") and "\n" not in err


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1) and parse_shard("3/4") == (3, 4)


@pytest.mark.parametrize("first", [0, 1])
def test_a_slurm_array_gives_every_shard_once_whether_it_counts_from_0_or_1(first):
    """`--shard slurm` under `sbatch --array=1-4` (or 0-3): tasks 1..4 run shards 0..3."""
    shards = [
        parse_shard("slurm", {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(first),
                              "SLURM_ARRAY_TASK_COUNT": "4"})
        for task in range(first, first + 4)
    ]  # fmt: skip
    assert shards == [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_shard_slurm_outside_an_array_says_what_is_missing(capsys, monkeypatch):
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["run", "--config", "configs/tiny.yaml", "--shard", "slurm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("booster: error: --shard slurm: SLURM_ARRAY_TASK_ID") and err.count("\n") == 1


# -- the ranks of one launch ------------------------------------------------------------------------


def _rank(rank: int, port: int, out: str) -> None:
    """One of two ranks (gloo, CPU) running the sft alignment: interrupted, resumed, damaged, reused."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE="2",
        OMP_NUM_THREADS="1",
    )
    import torch

    from booster.config import load_config
    from booster.stages.align import run_align
    from booster.stages.common import JsonlMetrics

    torch.set_num_threads(1)
    sets = ["methods=[sft]", "align.max_steps=4", "align.save_steps=2", "align.logging_steps=1"]
    config = load_config("configs/tiny.yaml", [f"output_dir={out}", *sets])
    log = JsonlMetrics.on_log

    def interrupted(self, args, state, control, logs=None, **kwargs):
        log(self, args, state, control, logs=logs, **kwargs)
        if state.global_step == 3:
            raise KeyboardInterrupt

    JsonlMetrics.on_log = interrupted
    with contextlib.suppress(KeyboardInterrupt):
        run_align(config, "sft", 0, progress=False)
    JsonlMetrics.on_log = log
    runs = [run_align(config, "sft", 0, progress=False)]
    if rank == 0:  # damage the model: the main process finds it, every rank trains again
        adapter = runs[0].path / "model" / "adapter_model.safetensors"
        adapter.write_bytes(adapter.read_bytes()[:-1] + b"x")
    runs += [run_align(config, "sft", 0, progress=False), run_align(config, "sft", 0, progress=False)]
    rows = [
        {"reused": r.reused, "steps": r.info["steps"], "resumed_from": r.info["resumed_from"]} for r in runs
    ]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(rows))


def test_the_ranks_of_one_launch_follow_the_main_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert rows[0] == rows[1]
    resumed, retrained, reused = rows[0]
    assert (
        not resumed["reused"] and resumed["steps"] == 4 and resumed["resumed_from"].endswith("checkpoint-2")
    )
    assert not retrained["reused"] and retrained["resumed_from"] is None
    assert reused["reused"]
    [stage] = [p for p in (tmp_path / "align").iterdir() if ".damaged-" not in p.name]
    assert len(list((tmp_path / "align").glob("*.damaged-*"))) == 1
    steps = [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4]


# -- the GGUF cache -------------------------------------------------------------------------------

CONVERT = """
import sys, time
from pathlib import Path
import booster.models as models

def fake_conversion(path, out):
    with open(sys.argv[2], "a") as fh:
        fh.write(f"{out.name}\\n")
    time.sleep(2)
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(out / "model.safetensors"))
    (out / "config.json").write_text("{}")

models._convert_gguf = fake_conversion
print(models.converted_gguf(Path(sys.argv[1])))
"""


def test_two_processes_convert_a_gguf_once_into_the_same_cache_folder(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF fake")
    log = tmp_path / "conversions.log"
    env = {**os.environ, "PYTHONPATH": SRC, "BOOSTER_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONVERT, str(gguf), str(log)], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    paths = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    cached = tmp_path / "cache" / "gguf" / f"model-{gguf.stat().st_size}"
    assert paths == [str(cached), str(cached)]
    assert len(log.read_text().splitlines()) == 1
    assert sorted(p.name for p in cached.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in cached.parent.iterdir() if p.name != f".{cached.name}.lock"] == [cached.name]


def test_a_killed_conversion_leaves_nothing_the_next_one_keeps(tmp_path, monkeypatch):
    import booster.models as models

    monkeypatch.setenv("BOOSTER_CACHE", str(tmp_path))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF fake")
    cached = tmp_path / "gguf" / f"model-{gguf.stat().st_size}"
    cached.parent.mkdir(parents=True)
    orphans = [cached.with_name(f".{cached.name}.k1ll3d.tmp"), cached.with_name(cached.name + ".tmp")]
    for orphan in orphans:
        orphan.mkdir()
        (orphan / "model.safetensors").write_bytes(b"half")
    cached.mkdir()  # an incomplete cache entry (no config.json) is replaced

    def fake_conversion(path, out):
        assert not any(o.exists() for o in orphans)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", fake_conversion)
    assert models.converted_gguf(gguf) == cached
    assert (cached / "config.json").exists()
    assert sorted(p.name for p in cached.parent.iterdir()) == sorted([f".{cached.name}.lock", cached.name])


@pytest.mark.parametrize("damage", ["cut weights", "cut tokenizer", "no weights"])
def test_a_damaged_cache_entry_is_set_aside_once_and_converted_again(tmp_path, monkeypatch, capfd, damage):
    """A cached conversion cut later (a full disk, a kill during a copy) must not fail every load."""
    import torch
    from safetensors.torch import save_file

    import booster.models as models

    monkeypatch.setenv("BOOSTER_CACHE", str(tmp_path))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF fake")
    conversions = []

    def fake_conversion(path, out):
        conversions.append(out)
        save_file({"w": torch.arange(1000.0)}, str(out / "model.safetensors"))
        (out / "config.json").write_text("{}")
        (out / "tokenizer.json").write_text('{"model": {"vocab": {}}}')

    monkeypatch.setattr(models, "_convert_gguf", fake_conversion)
    cached = models.converted_gguf(gguf)
    assert models.converted_gguf(gguf) == cached and len(conversions) == 1  # a whole entry is reused
    if damage == "cut weights":
        weights = cached / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "cut tokenizer":
        (cached / "tokenizer.json").write_text('{"model": {"vo')
    else:
        (cached / "model.safetensors").unlink()
    capfd.readouterr()

    assert models.converted_gguf(gguf) == cached and len(conversions) == 2
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("booster: warning:")]
    assert len(warnings) == 1 and str(cached) in warnings[0] and "converting again" in warnings[0]
    assert models.cache_damage(cached) is None
    assert len(list(cached.parent.glob(f"{cached.name}.damaged-*"))) == 1
    assert models.converted_gguf(gguf) == cached and len(conversions) == 2


def test_publishing_keeps_a_complete_folder_that_appeared_meanwhile(tmp_path):
    from booster.models import publish_dir

    final, ours = tmp_path / "final", tmp_path / "ours"
    final.mkdir()
    (final / "config.json").write_text('{"theirs": 1}')
    ours.mkdir()
    (ours / "config.json").write_text('{"ours": 1}')
    assert not publish_dir(ours, final)
    assert not ours.exists() and json.loads((final / "config.json").read_text()) == {"theirs": 1}
    ours.mkdir()
    (ours / "config.json").write_text('{"ours": 1}')
    (final / "config.json").unlink()  # incomplete: replaced
    assert publish_dir(ours, final) and json.loads((final / "config.json").read_text()) == {"ours": 1}
