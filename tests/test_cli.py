"""The CLI's error contract: user errors are one line and exit code 2, bugs keep their traceback."""

from __future__ import annotations

import pytest

from kinfonce import cli
from kinfonce.errors import KinfonceError


def fail_with(error: Exception):
    def handler(args):
        raise error

    return handler


def test_user_error_is_one_line_with_exit_code_2(monkeypatch, capsys):
    monkeypatch.setattr(
        cli, "_run_report", fail_with(KinfonceError("--output-dir must be a folder"))
    )
    assert cli.main(["report", "somewhere"]) == 2
    err = capsys.readouterr().err
    assert err == "kinfonce report: error: --output-dir must be a folder\n"


@pytest.mark.parametrize("error", [RuntimeError("a bug"), ValueError("a bug"), KeyError("k")])
def test_other_exceptions_keep_their_traceback(monkeypatch, error):
    # Catches a CLI that turns real bugs (RuntimeError, a plain ValueError from a library)
    # into one line, hiding where they came from.
    monkeypatch.setattr(cli, "_run_report", fail_with(error))
    with pytest.raises(type(error)):
        cli.main(["report", "somewhere"])


def test_missing_file_is_a_user_error(capsys):
    assert cli.main(["report", "/nonexistent/run"]) == 2
    assert "does not exist" in capsys.readouterr().err
