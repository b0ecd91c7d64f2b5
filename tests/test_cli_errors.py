"""The command line's error policy: a user's error (HeadprobeError, or an OS error on a path) is one line and exit
2; anything else is a bug and keeps its traceback; --debug / HEADPROBE_DEBUG=1 keeps it for user errors too."""
from __future__ import annotations

import errno
import os

import pytest

from headprobe import HeadprobeError, InputError
from headprobe.extract.extractor import ExtractError
from headprobe.extract.models import ModelLoadError
from headprobe.extract.store import StoreError
from headprobe.extract.tasks import TaskError
from headprobe.probes.checkpoint import CheckpointError
from headprobe.train.cli import guarded, main
from headprobe.train.fit import TrainError


def _fail(err: BaseException):
    def work():
        raise err
    return work


@pytest.mark.parametrize("cls", [InputError, ExtractError, ModelLoadError, StoreError, TaskError, CheckpointError,
                                 TrainError])
def test_every_user_error_is_a_headprobe_error_printed_as_one_line(cls, capsys, monkeypatch):
    monkeypatch.delenv("HEADPROBE_DEBUG", raising=False)
    assert issubclass(cls, HeadprobeError)
    with pytest.raises(SystemExit) as done:
        guarded("headprobe", _fail(cls("--x 5: pass a positive number\nsecond line")))
    err = capsys.readouterr().err
    assert done.value.code == 2 and err == "headprobe: error: --x 5: pass a positive number\n"


def test_a_bug_keeps_its_traceback(capsys, monkeypatch):
    monkeypatch.delenv("HEADPROBE_DEBUG", raising=False)
    with pytest.raises(ValueError, match="operands could not be broadcast"):
        guarded("headprobe", _fail(ValueError("operands could not be broadcast together")))
    assert capsys.readouterr().err == ""


def test_debug_shows_the_traceback_of_user_errors(monkeypatch):
    monkeypatch.setenv("HEADPROBE_DEBUG", "1")
    with pytest.raises(InputError):
        guarded("headprobe", _fail(InputError("bad")))


def test_debug_flag_anywhere_on_the_command_line(monkeypatch, tmp_path):
    monkeypatch.delenv("HEADPROBE_DEBUG", raising=False)
    with pytest.raises(HeadprobeError):  # a missing checkpoint folder, raised instead of printed
        main(["hub", "show", str(tmp_path / "missing"), "--debug"])


def test_full_disk_names_the_path_and_what_to_do(capsys, monkeypatch):
    monkeypatch.delenv("HEADPROBE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as done:
        guarded("headprobe", _fail(OSError(errno.ENOSPC, "No space left on device", "/data/out.h5")))
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and err.startswith("headprobe: error: /data/out.h5: no space left")
    assert "\n" not in err


def test_debug_flag_does_not_outlive_its_command(monkeypatch, tmp_path):
    monkeypatch.delenv("HEADPROBE_DEBUG", raising=False)
    with pytest.raises(HeadprobeError):
        main(["hub", "show", str(tmp_path / "missing"), "--debug"])
    assert "HEADPROBE_DEBUG" not in os.environ
