"""`ChildCall`: a function run in a fresh interpreter unless the package to keep out is imported here."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from helix_server.platform.child_process import ChildCall, call_keeping_out

ABSENT = "helix_no_such_package"  # never imported: calls that keep it out run in a child


def test_runs_in_a_child_when_the_package_is_not_imported():
    call = ChildCall("os", "getpid", keep_out=ABSENT)
    assert call.in_child
    assert call.result(timeout=60) != os.getpid()


def test_runs_here_when_the_package_is_already_imported():
    call = ChildCall("os", "getpid", keep_out="json")
    assert not call.in_child
    assert call.result() == os.getpid()


def test_arguments_and_results_travel_by_pickle():
    assert call_keeping_out(ABSENT, "json", "loads", '{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}


def test_the_functions_exception_is_raised_with_its_type():
    with pytest.raises(json.JSONDecodeError) as info:
        call_keeping_out(ABSENT, "json", "loads", "{")
    assert info.value.pos == 1


def test_what_the_function_prints_does_not_corrupt_the_result(capfd):
    assert call_keeping_out(ABSENT, "builtins", "print", "printed by the child") is None
    assert "printed by the child" in capfd.readouterr().err


def test_a_child_that_dies_is_reported():
    with pytest.raises(RuntimeError, match="exited with status 3"):
        call_keeping_out(ABSENT, "os", "_exit", 3)


def test_a_cancelled_call_leaves_no_process():
    call = ChildCall("time", "sleep", 60, keep_out=ABSENT)
    call.cancel()
    assert call._process.returncode is not None


@pytest.mark.parametrize("keep_out", [ABSENT, "json"])
def test_every_result_call_gives_the_same_outcome(keep_out):
    call = ChildCall("os", "getpid", keep_out=keep_out)
    assert call.result(timeout=60) == call.result()
    failing = ChildCall("json", "loads", "{", keep_out=keep_out)
    for _ in range(2):
        with pytest.raises(json.JSONDecodeError):
            failing.result(timeout=60)


def test_runs_here_when_no_process_can_be_started(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no processes here")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    call = ChildCall("os", "getpid", keep_out=ABSENT)
    assert not call.in_child
    assert call.result() == os.getpid()
