"""The command line: user mistakes exit 2 with one line and no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from booster.cli import main


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["align", "--config", "missing.yaml"], "config file 'missing.yaml' not found"),
        (["align", "--config", "configs/tiny.yaml", "--set", "align.lamda=1"], "did you mean 'align.lamb'"),
        (["run", "--config", "configs/tiny.yaml", "--set", "attack.poison_ratios=[2]"], "must be in [0, 1]"),
        (["align", "--config", "configs/tiny.yaml", "--set", "model=./nowhere"], "no such file or folder"),
        (["report", "no-such-run"], "no results.json"),
    ],
)
def test_user_errors(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.count("\n") == 1


def test_python_dash_m_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "booster", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("align", "attack", "evaluate", "run", "report", "data", "judge"):
        assert command in out.stdout
