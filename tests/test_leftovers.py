"""The run's own gate: a module that leaves a process, a ring or a listening socket fails.

Runs pytest on a small module written here (in a temporary copy of tests/ so it gets the
same conftest) that leaks one of each, and reads the failure it must give.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


LEAKY = '''
import socket
import subprocess
import sys
from multiprocessing.shared_memory import SharedMemory
import os

KEEP = []

def test_leaks_a_process_a_ring_and_a_socket():
    KEEP.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
    ring = SharedMemory(f"farm-test-{os.getpid()}-leak", create=True, size=64)
    ring.close()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    KEEP.append(server)


def test_cleans_up_its_own():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    s.close()
'''


def test_a_module_that_leaves_things_behind_fails_the_run_and_they_are_cleared(tmp_path: Path) -> None:
    here = Path(__file__).parent
    copy = tmp_path / "tests"
    copy.mkdir()
    for name in ("__init__.py", "conftest.py", "leftovers.py", "netns.py"):
        shutil.copy(here / name, copy / name)
    (copy / "data").symlink_to(here / "data")
    (copy / "test_leaky.py").write_text(LEAKY)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(copy / "test_leaky.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        # its own run marker; short waits for things to go away (they never will here)
        env={**{k: v for k, v in os.environ.items() if k != "FARM_TEST_SESSION"}, "FARM_TESTS_TIMEOUT_FACTOR": "0.05"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "2 passed, 1 error" in out, out
    assert "tests.test_leaky left behind:" in out, out
    assert "still running: " in out and "time.sleep(600)" in out, out
    assert "-leak left behind" in out, out
    # the module's own socket (not the one it closed); it stays open in the process, so the
    # run's check at the end names it too
    assert out.count("a listening socket") == 2, out
    assert not list(Path("/dev/shm").glob("farm-test-*-leak")), "the leaked ring was not cleared"
