"""Every user mistake ends in one line on stderr, exit 2 and no traceback, before any training.

Numbers that would run a broken or meaningless experiment (NaN weights, no end-of-sequence token,
zero training steps, a seed counted twice) are refused at config load; a full disk or a path that
cannot be written is one line too, wherever it happens.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from booster.cli import main
from booster.config import RunConfig, load_config, load_sweep
from booster.errors import UserError

TINY = ["--config", "configs/tiny.yaml"]


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI, check it failed as a user error (exit 2, one line, no traceback); the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("booster: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def set_error(capsys, tmp_path, *overrides: str) -> str:
    """``booster align`` on the tiny config with ``--set`` overrides, into a temp folder."""
    argv = ["align", *TINY, "--output-dir", str(tmp_path / "out")]
    for override in overrides:
        argv += ["--set", override]
    line = one_line_error(capsys, argv)
    assert not (tmp_path / "out").exists(), "nothing may run before the error"
    return line


# -- 1. non-finite numbers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["align.lamb=.nan"], "align.lamb must be a finite number, got nan"),
        (["align.alpha=.inf"], "align.alpha must be a finite number, got inf"),
        (["align.learning_rate=.inf"], "align.learning_rate must be a finite number, got inf"),
        (["align.learning_rate='1e400'"], "align.learning_rate must be a finite number, got inf"),
        (["attack.learning_rate=1e400"], "attack.learning_rate must be a finite number, got inf"),
        (["align.lamb=1" + "0" * 400], "align.lamb must be a finite number, got 1000"),
        (["attack.poison_ratios=[0.1, .nan]"], "attack.poison_ratios[1] must be a finite number, got nan"),
        (["align.lamb=[1, -.inf]"], "align.lamb must be a finite number, got -inf"),  # a sweep value
        (["attack.warmup_ratio=[0.1, .nan]"], "attack.warmup_ratio must be a finite number, got nan"),
    ],
)
def test_non_finite_numbers(capsys, tmp_path, overrides, needle):
    assert needle in set_error(capsys, tmp_path, *overrides)


def test_every_float_setting_must_be_finite():
    """Walks the dataclasses, so a float setting added later is covered without a new test."""
    from booster.config import _floats

    keys = [key for key, _ in _floats(RunConfig())]
    assert {"align.lamb", "model.lora.dropout", "attack.poison_ratios[0]", "attack.lisa_rho"} <= set(keys)
    defaults = load_config("configs/tiny.yaml")
    for key in keys:
        name, _, index = key.partition("[")
        for value, shown in ((".nan", "nan"), ("-.inf", "-inf")):
            if index:  # one element of a list setting: the others keep the config's values
                section, field_name = name.split(".")
                items = [repr(v) for v in getattr(getattr(defaults, section), field_name)]
                items[int(index.rstrip("]"))] = value
                value = f"[{', '.join(items)}]"
            with pytest.raises(UserError, match=re.escape(f"{key} must be a finite number, got {shown}")):
                load_config("configs/tiny.yaml", [f"{name}={value}"])


def test_in_a_real_process_there_is_no_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "booster", "run", *TINY, "--set", "align.lamb=.nan", "--dry-run"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path("src").resolve())},
    )
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        == "booster: error: configs/tiny.yaml (with --set): align.lamb must be a finite number, got nan"
    )


# -- 2. ranges ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["align.lamb=-1"], "align.lamb must be >= 0, got -1.0"),
        (["align.alpha=-0.1"], "align.alpha must be >= 0, got -0.1"),
        (["align.harmful_batch_size=0"], "align.harmful_batch_size must be >= 1 or null, got 0"),
        (["align.harmful_batch_size=-3"], "align.harmful_batch_size must be >= 1 or null, got -3"),
        (["evaluate.batch_size=0"], "evaluate.batch_size must be >= 1 or auto, got 0"),
        (["align.max_length=0"], "align.max_length must be >= 1 (tokens per sample), got 0"),
        (["attack.max_length=-1"], "attack.max_length must be >= 1 (tokens per sample), got -1"),
        (["model.lora.r=0"], "model.lora.r must be >= 1, got 0"),
        (["model.lora.alpha=0"], "model.lora.alpha must be > 0, got 0"),
        (["model.lora.alpha=-4"], "model.lora.alpha must be > 0, got -4"),
        (["model.lora.dropout=1"], "model.lora.dropout must be in [0, 1), got 1.0"),
        (["model.lora.dropout=-0.1"], "model.lora.dropout must be in [0, 1), got -0.1"),
        (["align.warmup_ratio=1"], "align.warmup_ratio must be in [0, 1), got 1.0"),
        (["attack.warmup_ratio=-0.1"], "attack.warmup_ratio must be in [0, 1), got -0.1"),
        (["align.save_steps=-1"], "align.save_steps must be >= 0 (0: save only at the end), got -1"),
        (["attack.max_grad_norm=-1"], "attack.max_grad_norm must be >= 0 (0: no clipping), got -1.0"),
        (["align.weight_decay=-0.1"], "align.weight_decay must be >= 0 (0: no decay), got -0.1"),
        (["attack.logging_steps=-1"], "attack.logging_steps must be >= 1, got -1"),
        (["align.logging_steps=0"], "align.logging_steps must be >= 1, got 0"),  # transformers refuses 0
        (["evaluate.harmful_samples=0"], "evaluate.harmful_samples must be >= 1, got 0"),
        (["attack.probe_samples=0"], "attack.probe_samples must be >= 1, got 0"),
        (["attack.probe_every=0"], "attack.probe_every must be >= 1 (null: about 4 points), got 0"),
        (["evaluate.task_samples=-1"], "evaluate.task_samples must be >= 0 (0 skips FA), got -1"),
        (["align.alignment_samples=0"], "align.alignment_samples must be >= 1 or null, got 0"),
        (["align.harmful_samples=0"], "align.harmful_samples must be >= 1 or null, got 0"),
        (["attack.max_steps=0"], "attack.max_steps must be -1 (train for epochs) or >= 1, got 0"),
        (["align.max_steps=-2"], "align.max_steps must be -1 (train for epochs) or >= 1, got -2"),
        (["align.max_steps=-1", "align.epochs=0"], "align.epochs must be > 0 when max_steps is -1, got 0.0"),
        (["attack.max_steps=-1", "attack.epochs=-1"], "attack.epochs must be > 0 when max_steps is -1"),
        (["seeds=[-1]"], "seeds must be in [0, 4294967295], got -1"),
        (["align.lamb=[5, -1]"], "align.lamb must be >= 0, got -1.0"),  # every swept value
    ],
)
def test_ranges(capsys, tmp_path, overrides, needle):
    assert needle in set_error(capsys, tmp_path, *overrides)


@pytest.mark.parametrize(
    "override",
    [
        "align.save_steps=0",
        "attack.max_grad_norm=0",
        "align.weight_decay=0",
        "evaluate.task_samples=0",
        "align.alignment_samples=null",
        "align.harmful_batch_size=null",
        "align.epochs=0",  # max_steps is set, so epochs are not used
        "align.lamb=0",
        "model.lora.dropout=0.05",
    ],
)
def test_zero_where_it_means_off_stays_allowed(override):
    load_config("configs/tiny.yaml", [override])


# -- 3. names checked against the libraries ----------------------------------------------------------


@pytest.mark.parametrize(
    "override,needle",
    [
        (
            "align.lr_scheduler=cosin",
            "align.lr_scheduler must be a transformers scheduler, got 'cosin'; did you mean 'cosine'?",
        ),
        (
            "attack.optim=adamw_troch",
            "attack.optim must be a transformers optimizer, got 'adamw_troch'; did you mean 'adamw_torch'?",
        ),
        (
            "attack.lr_scheduler=reduce_lr_on_plateau",
            "needs an evaluation during training, which booster does not pass",
        ),
        ("align.lr_scheduler=cosine_with_min_lr", "needs lr_scheduler_kwargs (min_lr)"),
        ("attack.optim=adam", "got 'adam'; did you mean 'adamw_torch'?"),  # a prefix first
        ("model.dtype=bfloat61", "model.dtype must be a dtype, got 'bfloat61'; did you mean 'bfloat16'?"),
    ],
)
def test_names_with_suggestions(capsys, tmp_path, override, needle):
    assert needle in set_error(capsys, tmp_path, override)


def test_every_usable_scheduler_and_optimizer_name_loads():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from booster.config import SCHEDULERS_NEEDING_MORE

    for scheduler in SchedulerType:
        if scheduler.value not in SCHEDULERS_NEEDING_MORE:
            load_config("configs/tiny.yaml", [f"align.lr_scheduler={scheduler.value}"])
    for optim in ("adamw_torch", "sgd", "adafactor", OptimizerNames.ADAMW_TORCH_FUSED.value):
        load_config("configs/tiny.yaml", [f"attack.optim={optim}"])


def test_a_lora_module_the_model_lacks_stops_before_training(capsys, tmp_path):
    line = set_error(capsys, tmp_path, "model.lora.target_modules=[q_proj, qkv_proj]")
    assert "model.lora.target_modules: the llama model has no module 'qkv_proj'" in line
    assert (
        "its linear modules are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
        in line
    )


def test_a_lora_module_that_is_not_linear(tiny_tokenizer):
    from booster.models import LoraSettings, add_lora, build_tiny_model

    with pytest.raises(UserError, match="'input_layernorm' is a LlamaRMSNorm, which LoRA cannot wrap"):
        add_lora(build_tiny_model(tiny_tokenizer), LoraSettings(target_modules=["input_layernorm"]))
    model = add_lora(
        build_tiny_model(tiny_tokenizer), LoraSettings(target_modules=["layers.0.self_attn.q_proj"])
    )
    assert sum("lora_A" in name for name, _ in model.named_parameters()) == 1  # a full name works


def test_no_lora_target_modules(capsys, tmp_path):
    assert "model.lora.target_modules is empty" in set_error(capsys, tmp_path, "model.lora.target_modules=[]")


# -- 4. lists ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,needle",
    [
        ("seeds=[0, 1, 0]", "seeds lists 0 twice; give each value once"),
        ("methods=[sft, booster, sft]", "methods lists 'sft' twice"),
        ("attack.poison_ratios=[0.1, 0.2, 0.1]", "attack.poison_ratios lists 0.1 twice"),
        ("seeds=[]", "seeds is empty; list at least one"),
    ],
)
def test_lists(capsys, tmp_path, override, needle):
    assert needle in set_error(capsys, tmp_path, override)


# -- 5. empty and non-UTF-8 files --------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n  # and another\n"])
def test_an_empty_config_is_an_error(capsys, tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    line = one_line_error(capsys, ["run", "--config", str(path), "--dry-run"])
    assert f"{path} is empty" in line


def test_a_config_that_is_not_utf8(capsys, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: tiny\n# café\nseeds: [0]\n".encode("latin-1"))
    line = one_line_error(capsys, ["run", "--config", str(path), "--dry-run"])
    assert f"{path} line 2: not UTF-8 text (byte 0xe9 at offset 17" in line


def test_a_bom_is_fine_and_offsets_count_it(tmp_path):
    from booster.data.local import read_text

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(UserError, match=r"line 2: not UTF-8 text \(byte 0xff at offset 19"):
        read_text(path)
    path.write_bytes(b"\xef\xbb\xbfmodel: tiny\n")
    assert read_text(path) == "model: tiny\n"


def test_a_data_file_that_is_not_utf8(capsys, tmp_path):
    path = tmp_path / "alignment.jsonl"
    good = Path("configs/data/tiny/alignment.jsonl").read_bytes().splitlines(keepends=True)
    path.write_bytes(good[0] + good[1].replace(b'"', '"¿'.encode("latin-1"), 1) + good[2])
    line = set_error(capsys, tmp_path, f"align.alignment_data={path}")
    assert f"alignment.jsonl line 2: not UTF-8 text (byte 0xbf at offset {len(good[0]) + 2}" in line


def test_a_config_that_is_a_folder(capsys, tmp_path):
    assert "is a folder; pass a YAML file" in one_line_error(capsys, ["align", "--config", str(tmp_path)])


# -- 6. the output folder ----------------------------------------------------------------------------


def test_output_dir_that_is_a_file(capsys, tmp_path):
    path = tmp_path / "results"
    path.write_text("not a folder")
    line = one_line_error(capsys, ["run", *TINY, "--output-dir", str(path)])
    assert f"output_dir {str(path)!r} is a file; set output_dir (or --output-dir) to a folder" in line
    line = one_line_error(capsys, ["align", *TINY, "--output-dir", str(path / "sub")])
    assert f"cannot be created: {str(path)!r} is a file" in line


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a read-only /sys (Linux)")
def test_output_dir_that_cannot_be_written_even_by_root(capsys):
    line = one_line_error(capsys, ["run", *TINY, "--output-dir", "/sys/booster-runs", "--dry-run"])
    assert "output_dir '/sys/booster-runs': cannot write in '/sys'" in line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permission bits")
def test_output_dir_without_write_permission(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        line = one_line_error(capsys, ["run", *TINY, "--output-dir", str(locked / "runs")])
    finally:
        locked.chmod(0o700)
    assert "cannot write in" in line and "Permission denied" in line


def test_the_write_probe_leaves_nothing_behind(tmp_path):
    from booster.cli import check_output_dir

    check_output_dir(tmp_path / "not" / "yet")
    assert list(tmp_path.iterdir()) == []


# -- 7. and 8. a full disk, a path that cannot be written -----------------------------------------


def failing_writer(monkeypatch, error: BaseException) -> None:
    """The alignment stage's first write (its config.yaml, after loading model and data) fails."""

    def write(path, text):  # noqa: ARG001
        raise error

    monkeypatch.setattr("booster.stages.align.write_text_atomic", write)


def test_a_full_disk_is_one_line(capsys, tmp_path, monkeypatch):
    target = str(tmp_path / "out" / "config.yaml")
    failing_writer(monkeypatch, OSError(errno.ENOSPC, "No space left on device", target))
    line = one_line_error(capsys, ["align", *TINY, "--method", "sft", "--output-dir", str(tmp_path / "out")])
    assert line == (
        f"booster: error: no space left on device while writing {target} "
        "(free some space or set output_dir elsewhere); finished stages are kept\n"
    )


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2317056 vs 2316944"),
        RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"),
        ValueError("saving failed"),  # wrapping a full disk: found through the cause chain
    ],
)
def test_torch_and_wrapped_full_disk_errors(capsys, tmp_path, monkeypatch, error):
    if isinstance(error, ValueError):
        error.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    failing_writer(monkeypatch, error)
    out = str(tmp_path / "out")
    line = one_line_error(capsys, ["align", *TINY, "--method", "sft", "--output-dir", out])
    assert f"no space left on device while writing {out} (free some space" in line


@pytest.mark.parametrize(
    "error,needle",
    [
        (
            PermissionError(errno.EACCES, "Permission denied", "/data/x"),
            "/data/x: Permission denied; check the path",
        ),
        (
            IsADirectoryError(errno.EISDIR, "Is a directory", "/data/y"),
            "/data/y: Is a directory; check the path",
        ),
        (OSError(errno.EROFS, "Read-only file system", "/data/z"), "/data/z: Read-only file system"),
    ],
)
def test_a_path_that_cannot_be_written(capsys, tmp_path, monkeypatch, error, needle):
    failing_writer(monkeypatch, error)
    argv = ["align", *TINY, "--method", "sft", "--output-dir", str(tmp_path / "out")]
    assert needle in one_line_error(capsys, argv)


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    failing_writer(monkeypatch, ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        main(["align", *TINY, "--method", "sft", "--output-dir", str(tmp_path / "out")])


def test_shipped_configs_pass_every_check():
    shipped = [p for p in sorted(Path("configs").rglob("*.yaml")) if "accelerate" not in p.parts]
    for path in shipped:
        load_sweep(path)
