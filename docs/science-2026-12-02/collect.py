"""Copy each finished stage's measured files (done.json, evaluation, metrics.jsonl; no weights, no
generations) into this folder's data/, named by method, seed and attack settings.

Usage: python docs/science-2026-12-02/collect.py docs/science-2026-12-02/data runs/science runs/science-epochs
"""

import json
import shutil
import sys
from pathlib import Path

import yaml


def stage_name(stage: Path) -> str:
    done = json.loads((stage / "done.json").read_text())
    if done["stage"] != "attack":
        return f"align-{done['method']}-seed{done['seed']}"
    attack = yaml.safe_load((stage / "config.yaml").read_text())["attack"]
    lr = f"{attack['learning_rate']:.0e}".replace("e-0", "e-")
    return (
        f"attack-{done['method']}-seed{done['seed']}-lr{lr}-ep{attack['epochs']:g}-{done['mode']}"
        f"-p{done['poison_ratio']:g}"
    )


def main(out: Path, roots: list[Path]) -> None:
    for root in roots:
        for stage in sorted(root.glob("align/*/")) + sorted(root.glob("attack/*/")):
            if not (stage / "done.json").exists():
                continue
            name = stage_name(stage)
            shutil.copy(stage / "done.json", out / f"{name}-done.json")
            if (stage / "metrics.jsonl").exists():
                shutil.copy(stage / "metrics.jsonl", out / f"{name}-metrics.jsonl")
            for evaluation in stage.glob("eval-*.json"):
                shutil.copy(evaluation, out / f"{name}-eval.json")
            print(name)


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
