"""booster-llm: Booster alignment against harmful fine-tuning, with the attack and its measurement.

``from booster import BoosterConfig, BoosterTrainer`` gives the Trainer-level API, and
``booster.attack`` / ``booster.evaluate`` the attack and its measurement on a model in memory
(:mod:`booster.api`); the heavy imports (torch, transformers) happen on first use so that
``booster --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from booster.version import __version__

__all__ = [
    "BoosterConfig",
    "BoosterTrainer",
    "LMTrainer",
    "__version__",
    "attack",
    "booster_correction",
    "evaluate",
]

if TYPE_CHECKING:
    from booster.api import attack, evaluate
    from booster.methods.booster import BoosterConfig, BoosterTrainer, booster_correction
    from booster.training import LMTrainer


def __getattr__(name: str) -> Any:
    if name == "LMTrainer":  # imported on first use: torch and transformers would slow `booster --help`
        from booster.training import LMTrainer

        return LMTrainer
    if name in ("BoosterConfig", "BoosterTrainer", "booster_correction"):  # the same: on first use
        from booster.methods import booster

        return getattr(booster, name)
    if name in ("attack", "evaluate"):  # the same: on first use
        from booster import api

        return getattr(api, name)
    raise AttributeError(f"module 'booster' has no attribute {name!r}")
