"""booster-llm: Booster alignment against harmful fine-tuning, with the attack and its measurement.

``from booster import BoosterConfig, BoosterTrainer`` gives the Trainer-level API; the heavy
imports (torch, transformers) happen on first use so that ``booster --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["BoosterConfig", "BoosterTrainer", "LMTrainer", "booster_correction"]

if TYPE_CHECKING:
    from booster.methods.booster import booster_correction
    from booster.training import BoosterConfig, BoosterTrainer, LMTrainer


def __getattr__(name: str) -> Any:
    if name in ("BoosterConfig", "BoosterTrainer", "LMTrainer"):
        from booster import training

        return getattr(training, name)
    if name == "booster_correction":
        from booster.methods.booster import booster_correction

        return booster_correction
    raise AttributeError(f"module 'booster' has no attribute {name!r}")
