"""Suite-wide guard: no test may leave processes behind (DHT nodes, averagers, p2pd).

A leaked p2pd keeps ports and CPU busy and makes later swarm tests flaky, so leftovers
are killed and the test that leaked them fails.
"""

from __future__ import annotations

import multiprocessing as mp

import psutil
import pytest

# hivemind's DHT and averagers are forked processes (spawn can't pickle them)
mp.set_start_method("fork", force=True)


# started once by torch for shared-memory tensors and kept for the life of the process
PROCESS_WIDE_HELPERS = {"torch_shm_manager"}


@pytest.fixture(autouse=True)
def no_leaked_processes():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    leaked = []
    for _ in range(50):  # shutdown is asynchronous: give children a few seconds to exit
        leaked = [p for p in psutil.Process().children(recursive=True)
                  if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                  and p.name() not in PROCESS_WIDE_HELPERS]
        if not leaked:
            return
        psutil.wait_procs(leaked, timeout=0.1)
    names = sorted({p.name() for p in leaked})
    for p in leaked:
        p.kill()
    pytest.fail(f"test left {len(leaked)} child processes running: {names}")
