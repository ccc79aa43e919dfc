"""Booster + Vaccine: Booster's correction with a Vaccine-style alignment pass (the reference's
``perturb_aware``).

The harmful passes of Booster see the plain model; only the alignment pass is perturbed. The
arithmetic is Booster's (:mod:`booster.methods.booster`) and Vaccine's (:mod:`booster.methods.vaccine`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from booster.methods.booster import BoosterConfig, BoosterTrainer
from booster.methods.vaccine import VaccineMixin, _check_vaccine, _rho_field, _target_field


@dataclass
class BoosterVaccineConfig(BoosterConfig):
    """BoosterConfig plus Vaccine's rho and target, for Booster with a Vaccine-style alignment pass."""

    vaccine_rho: float = _rho_field()
    vaccine_target: str = _target_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_vaccine(self)


class BoosterVaccineTrainer(VaccineMixin, BoosterTrainer):
    """Booster + Vaccine: lamb * (g_h - g_h') plus the perturbation-aware alignment gradient.

    The harmful passes of Booster see the plain model (they do not go through ``compute_loss``);
    only the alignment pass is perturbed, as in the reference's ``perturb_aware``.
    """

    args: BoosterVaccineConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not hasattr(self.args, "vaccine_rho"):
            raise TypeError("BoosterVaccineTrainer needs args=BoosterVaccineConfig(...)")
        self._init_vaccine()
