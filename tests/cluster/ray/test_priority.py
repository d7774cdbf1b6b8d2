"""cluster.ray.priority: the desk and its tasks lower every thread of their process, never raise one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from cluster.ray.priority import BACKGROUND_NICENESS, WORKER_NICENESS
from cluster.ray.runtime import ray_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")

# In a child process: lowering a priority cannot be undone without privileges.
_CHILD = textwrap.dedent(
    """
    import json, os, threading
    from cluster.ray.priority import niceness, yield_to_serving

    seen = {}
    started, started2, go = threading.Event(), threading.Event(), threading.Event()

    def before():  # exists when yield_to_serving runs
        started.set(); go.wait(); seen["before"] = niceness()

    def lowest():  # already below the background level: stays there
        os.setpriority(os.PRIO_PROCESS, 0, 15); started2.set(); go.wait(); seen["lowest"] = niceness()

    t1, t2 = threading.Thread(target=before), threading.Thread(target=lowest)
    t1.start(); t2.start(); started.wait(); started2.wait()
    seen["main_before"] = niceness()
    yield_to_serving()
    go.set(); t1.join(); t2.join()
    t3 = threading.Thread(target=lambda: seen.__setitem__("after", niceness()))  # made later: inherits
    t3.start(); t3.join()
    seen["main"] = niceness()
    print(json.dumps(seen))
    """
)


@pytest.mark.skipif(os.getpriority(os.PRIO_PROCESS, 0) >= 10, reason="this test run is already niced")
def test_every_thread_is_lowered_and_new_ones_inherit_it():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout)
    assert seen["main_before"] < BACKGROUND_NICENESS
    assert seen["before"] == seen["main"] == seen["after"] == BACKGROUND_NICENESS
    assert seen["lowest"] == 15  # never raised


def test_ray_workers_start_at_a_serving_priority():
    assert ray_env("disabled", None)["RAY_worker_niceness"] == str(WORKER_NICENESS)
    assert WORKER_NICENESS < BACKGROUND_NICENESS
