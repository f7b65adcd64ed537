"""latentgen.freed_memory: with it, a large block freed and allocated again reuses mapped pages instead of
faulting them in again (measured in a child process: the setting is process-wide and stays)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = """
import json, resource, sys
import torch
from latentgen.freed_memory import reuse_freed_memory
took = reuse_freed_memory() if sys.argv[1] == "on" else False
faults = []
for _ in range(4):  # a "step": activations of a few sizes, every page written, all freed at the end
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(size * 2**20, dtype=torch.uint8) for size in (40, 64, 48, 64)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"took": took, "faults": faults}))
"""


def _child(setting: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, setting], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
def test_freed_blocks_are_reused_without_page_faults():
    kept = _child("on")
    if not kept["took"]:
        pytest.skip("not glibc: reuse_freed_memory() does nothing here, by design")
    as_is = _child("off")
    pages = (40 + 64 + 48 + 64) * 2**20 // 4096
    # Without the setting each block of 32 MiB or more is a fresh mapping: every page faults in, every step.
    assert min(as_is["faults"][1:]) > pages // 2, as_is
    # With it the later steps reuse most of the heap the first one grew (a block whose aligned request is a few
    # bytes larger than the hole it left may still extend the heap; a whole SD step measured ~50 faults).
    assert sum(kept["faults"][1:]) < sum(as_is["faults"][1:]) / 2, (kept, as_is)


def test_elsewhere_than_linux_nothing_is_touched(monkeypatch):
    from latentgen import freed_memory

    monkeypatch.setattr(freed_memory.sys, "platform", "darwin")
    freed_memory.reuse_freed_memory.cache_clear()
    try:
        assert freed_memory.reuse_freed_memory() is False  # not Linux: nothing is touched
    finally:
        freed_memory.reuse_freed_memory.cache_clear()
