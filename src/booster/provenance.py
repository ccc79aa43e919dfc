"""Where a result came from: package versions, the source commit, device, precision and the model.

Recorded in every evaluation (``eval-*.json``, hence every ``results.json`` entry) under
``provenance`` and summarised in ``report.md``, so a number can be traced to the code, the
machine and the stage folder that produced it. Recorded when the evaluation runs and reused with
it, so rerunning a finished grid leaves ``results.json`` byte-identical.
"""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from booster.version import __version__

#: the packages whose versions change what a run computes.
PACKAGES = ("booster-llm", "torch", "transformers", "peft")


def package_versions() -> dict[str, str | None]:
    """Installed versions of :data:`PACKAGES` (booster-llm: the imported code's own version)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        if name == "booster-llm":
            versions[name] = __version__
            continue
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(checkout: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """``{"git_commit": sha, "git_dirty": bool}`` when booster runs from a source checkout (its
    ``src/booster`` is the one imported); empty when installed as a package or git is missing."""
    package = Path(__file__).resolve().parent
    checkout = package.parent.parent
    if not (checkout / "pyproject.toml").is_file() or not (checkout / ".git").exists():
        return {}
    top = _git(checkout, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != checkout:
        return {}
    commit = _git(checkout, "rev-parse", "HEAD")
    if commit is None:
        return {}
    status = _git(checkout, "status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(status)}


def device_name(model: Any) -> str:
    """``cpu``, or ``cuda (NVIDIA H100 80GB HBM3)``: where the model's weights are."""
    import torch  # heavy: loaded only where it is used, so light commands stay fast

    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        return "unknown"
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def precision(config: Any, stage_kind: str) -> str:
    """Weights dtype and the autocast of the training that made the model (alignment, and the
    attack for an attacked or repaired model)."""
    dtype = config.model.dtype
    parts = [f"weights {dtype}", f"align {'bf16 autocast' if config.align.bf16 else dtype}"]
    if stage_kind in ("attack", "repair"):
        parts.append(f"attack {'bf16 autocast' if config.attack.bf16 else dtype}")
    if getattr(config.evaluate, "bf16", False):
        parts.append("generation bfloat16")
    return ", ".join(parts)


def record(model: Any, config: Any, stage_dir: Path, root: Path) -> dict[str, Any]:
    """The ``provenance`` of an evaluation of the model in ``stage_dir`` (a folder of the run under
    ``root``; its path is recorded relative to it)."""
    stage_dir, root = Path(stage_dir), Path(root)
    try:
        stage = str(stage_dir.resolve().relative_to(root.resolve()))
    except ValueError:
        stage = str(stage_dir.resolve())
    return {
        "stage_dir": stage,
        "versions": package_versions(),
        **git_state(),
        "device": device_name(model),
        "precision": precision(config, stage_dir.parent.name),
    }


def report_lines(results: list[dict]) -> list[str]:
    """The report's provenance section: each distinct value once (several mean the entries were
    evaluated with different code or hardware)."""
    records = [r["provenance"] for r in results if isinstance(r.get("provenance"), dict)]
    if not records:
        return ["No provenance recorded (evaluated before booster recorded it)."]

    def distinct(values: list[Any]) -> str:
        shown = list(dict.fromkeys(v for v in values if v is not None))
        return ", ".join(f"`{v}`" for v in shown) if shown else "unknown"

    lines = []
    for package in PACKAGES:
        lines.append(f"- {package}: {distinct([(p.get('versions') or {}).get(package) for p in records])}")
    commits = [
        p["git_commit"] + (" (uncommitted changes)" if p.get("git_dirty") else "")
        for p in records
        if p.get("git_commit")
    ]
    lines.append(f"- git commit: {distinct(commits) if commits else 'none (not run from a source checkout)'}")
    lines.append(f"- device: {distinct([p.get('device') for p in records])}")
    lines.append(f"- precision: {distinct([p.get('precision') for p in records])}")
    missing = len(results) - len(records)
    if missing:
        lines.append(f"- {missing} of {len(results)} entries were evaluated before provenance was recorded")
    lines.append("- each entry's stage folder: `provenance.stage_dir` in results.json")
    return lines
