"""The apps' thread count: an explicit setting wins; otherwise only the cores other work leaves free, with a
log line when that is fewer than torch's own choice (latentgen.threads)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from latentgen import threads


@pytest.mark.parametrize(("setting", "busy", "cores", "current", "environment", "expected"), [
    (None, 0.2, 2, 2, {}, 2),                  # a quiet machine: torch's own choice
    (None, 1.0, 2, 2, {}, 1),                  # one core taken: one thread
    (None, 0.6, 2, 2, {}, 1),                  # more than half a core counts as taken
    (None, 7.5, 2, 2, {}, 1),                  # never fewer than one
    (None, 3.0, 16, 16, {}, 13),
    (None, 1.0, 4, 2, {}, 2),                  # enough free cores for what torch chose
    (None, None, 2, 2, {}, 2),                 # load unknown: unchanged
    (3, 2.0, 2, 2, {}, 3),                     # threads=N wins, even on a busy machine
    (None, 2.0, 2, 2, {"OMP_NUM_THREADS": "2"}, 2),  # so does the environment
])
def test_the_thread_count_follows_the_free_cores_unless_set(setting, busy, cores, current, environment, expected):
    chosen, reason = threads.choose_threads(setting, busy, cores, current, environment)
    assert chosen == expected
    assert (reason is not None) == (chosen < current and setting is None)
    if reason:
        assert f"{busy:.1f} of {cores} cores are busy" in reason and "threads=N overrides" in reason


def test_the_busy_cores_are_measured_from_the_machine():
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        busy = threads.busy_cores(0.5)
    finally:
        spinner.kill()
    assert busy is not None and busy >= 0.5  # the spinning process keeps (most of) a core busy


def test_configure_threads_sets_torch_and_says_why(monkeypatch, caplog):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "busy_cores", lambda: 1.0)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    try:
        torch.set_num_threads(2)
        with caplog.at_level(logging.INFO, logger="latentgen.threads"):
            assert threads.configure_threads(None) == 1
        assert torch.get_num_threads() == 1
        assert "1.0 of 2 cores are busy with other work: using 1 torch thread instead of 2" in caplog.text
        caplog.clear()
        assert threads.configure_threads(2) == 2 and torch.get_num_threads() == 2 and not caplog.text
    finally:
        torch.set_num_threads(before)
