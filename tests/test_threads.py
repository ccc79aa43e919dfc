"""Thread settings: intra-op threads = the usable cores, one inter-op thread, OMP_NUM_THREADS kept,
and the trained adapter the same, sha256 for sha256, with and without them (each in a fresh process,
since the inter-op pool is fixed once used)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from booster.threads import configure_threads, usable_cores

ROOT = Path(__file__).resolve().parent.parent

#: aligns the tiny config's Booster stage with or without the thread settings; prints the adapter's
#: file hashes (from done.json) and the thread counts it ran with.
ALIGN = """
import json, sys
import torch
from booster.threads import configure_threads
if sys.argv[2] == "configured":
    configure_threads()
from booster.config import load_config
from booster.stages.align import run_align
config = load_config("configs/tiny.yaml", [f"output_dir={sys.argv[1]}", "methods=[booster]"])
info = run_align(config, "booster", 0, progress=False).info
hashes = {name: record["sha256"] for name, record in info["files"].items() if "safetensors" in name}
print(json.dumps({"hashes": hashes, "threads": [torch.get_num_threads(), torch.get_num_interop_threads()]}))
"""


def _align(out: Path, mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    done = subprocess.run(
        [sys.executable, "-c", ALIGN, str(out), mode], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_thread_settings_do_not_change_the_adapter(tmp_path):
    default = _align(tmp_path / "default", "default")
    configured = _align(tmp_path / "configured", "configured")
    assert default["hashes"] and configured["hashes"] == default["hashes"]
    intra, inter = configured["threads"]
    assert inter == 1 and intra == min(default["threads"][0], usable_cores())


def test_usable_cores_follow_the_affinity_mask():
    if hasattr(os, "sched_getaffinity"):
        assert usable_cores() == len(os.sched_getaffinity(0))
    assert usable_cores() >= 1


def test_configure_keeps_omp_num_threads(monkeypatch):
    """A launcher's or the user's OMP_NUM_THREADS is theirs: nothing changes."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads(), torch.get_num_interop_threads()
    assert configure_threads() == before
