"""Typed config: YAML in, overrides, and one-line errors that name the key."""

from __future__ import annotations

import pytest

from booster.config import RunConfig, load_config
from booster.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_papers():
    c = RunConfig()
    assert (c.align.lamb, c.align.alpha, c.align.learning_rate, c.align.batch_size) == (5.0, 0.1, 5e-4, 10)
    assert (c.align.weight_decay, c.align.epochs, c.align.max_length, c.align.lr_scheduler) == (
        0.1,
        20,
        256,
        "constant",
    )
    assert (c.attack.learning_rate, c.attack.samples, c.attack.poison_ratios, c.attack.mode) == (
        1e-5,
        1000,
        [0.1],
        "single_lora",
    )


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "model: tiny\nalign:\n  lamb: 2\nattack:\n  poison_ratios: [0.0, 0.2]\n")
    c = load_config(path, ["align.alpha=0.5", "seeds=[1, 2]", "model=embedded", "evaluate.judge=keyword"])
    assert c.model.name == "embedded" and c.model.lora.r == 32
    assert c.align.lamb == 2.0 and isinstance(c.align.lamb, float)
    assert c.align.alpha == 0.5 and c.seeds == [1, 2] and c.attack.poison_ratios == [0.0, 0.2]
    assert c.evaluate.judge == "keyword"


def test_scalar_for_list_becomes_one_item(tmp_path):
    c = load_config(write(tmp_path, "attack:\n  poison_ratios: 0.2\n"))
    assert c.attack.poison_ratios == [0.2]


@pytest.mark.parametrize(
    "text,overrides,needle",
    [
        ("align:\n  lamda: 3\n", [], "unknown key 'align.lamda'; did you mean 'align.lamb'"),
        ("", ["align.lamb=abc"], "align.lamb must be a number, got 'abc'"),
        ("", ["model.lora.enabled='True'"], "model.lora.enabled must be true/false"),
        ("attack:\n  poison_ratios: [0.1, 1.5]\n", [], "each ratio must be in [0, 1]"),
        ("methods: [sft, boster]\n", [], "unknown method 'boster'; did you mean 'booster'"),
        ("align: [1, 2\n", [], "line"),
        ("- a\n- b\n", [], "top level must be a mapping"),
        ("", ["align.lamb"], "expected key=value"),
        ("attack:\n  mode: triple\n", [], "single_lora, double_lora or reference"),
    ],
)
def test_errors_name_the_culprit(tmp_path, text, overrides, needle):
    with pytest.raises(UserError) as err:  # no text: the defaults (an empty file is an error itself)
        load_config(write(tmp_path, text) if text else None, overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_parse():
    from pathlib import Path

    from booster.config import load_sweep

    shipped = [p for p in sorted(Path("configs").rglob("*.yaml")) if "accelerate" not in p.parts]
    assert Path("configs/quickstart.yaml") in shipped and Path("configs/tiny.yaml") in shipped
    for path in shipped:  # booster configs (sweeps too); configs/accelerate/ holds accelerate's own files
        load_sweep(path)


def test_settings_added_later_enter_fingerprints_only_when_set():
    import dataclasses

    from booster.config import added_later, settings_dict

    @dataclasses.dataclass
    class Section:
        old: int = 1
        new: str | None = added_later(None)
        listed: list[int] = added_later(default_factory=list)

    assert settings_dict(Section()) == {"old": 1}  # the fingerprint of a config written before
    assert settings_dict(Section(new="x", listed=[2])) == {"old": 1, "new": "x", "listed": [2]}
    config = load_config(None)
    evaluate = dataclasses.asdict(config.evaluate)
    evaluate.pop("task_data")
    evaluate.pop("bf16")
    evaluate.pop("probe_aligned")  # measures beside the evaluation, never changes its file
    assert settings_dict(config.evaluate) == evaluate
    # the speed settings at their defaults leave the stage fingerprints of earlier configs as they were
    for section in (config.align, config.attack):
        assert "group_by_length" not in settings_dict(section)
        section.group_by_length = True
        assert settings_dict(section)["group_by_length"] is True
