"""`dynsdpb --help` and `dynsdpb <command> --help` print their help and exit 0 for every subcommand
(argparse formats help strings with %, so a stray percent sign crashes --help only, not a run)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from dynsdpb_kernels.cli import build_parser, main


def _subcommands() -> list[str]:
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return sorted(actions[0].choices)


def test_the_command_has_its_subcommands():
    assert {"bench", "bench-head", "finetune", "study"} <= set(_subcommands())


@pytest.mark.parametrize("command", [[]] + [[name] for name in _subcommands()], ids=lambda c: c[0] if c else "top")
def test_help_prints_and_exits_zero(command, capsys):
    with pytest.raises(SystemExit) as done:
        main(command + ["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dynsdpb"), out[:200]
    if command:  # every option of the subcommand is listed, with its default
        for action in build_parser()._subparsers._group_actions[0].choices[command[0]]._actions:
            for flag in action.option_strings:
                assert flag in out, (command, flag)
    else:
        for name in _subcommands():
            assert name in out


def test_console_entry_point_help():
    """The installed `dynsdpb` script (or `python -m dynsdpb_kernels.cli` where the script is not on PATH)."""
    top = subprocess.run([sys.executable, "-m", "dynsdpb_kernels.cli", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert top.returncode == 0, top.stderr[-2000:]
    assert "95% CIs" in " ".join(top.stdout.split()), top.stdout  # the escaped percent sign, printed once
    study = subprocess.run([sys.executable, "-m", "dynsdpb_kernels.cli", "study", "--help"], capture_output=True,
                           text=True, timeout=120)
    assert study.returncode == 0, study.stderr[-2000:]
    assert "--summarize-only" in study.stdout
