"""The OpenBLAS kernels and the allocator a node runs Vosk with (farm/native.py): chosen from
the CPU's flags and what is installed, applied by ``farm up`` starting itself again, seen
in every process of the node."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from farm.native import best_core, choose_blas_core, cpu_flags, find_malloc, node_environ

from .conftest import DATA, MS, decode_heard, run_call, same_transcript, start_node


def test_the_best_kernels_the_flags_allow() -> None:
    avx512 = {"sse3", "avx", "avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
    assert best_core("GenuineIntel", avx512) == "SkylakeX"
    assert best_core("AuthenticAMD", avx512) == "SkylakeX"
    assert best_core("GenuineIntel", {"avx", "avx2", "fma"}) == "Haswell"
    assert best_core("AuthenticAMD", {"avx", "avx2", "fma"}) == "Zen"
    assert best_core("GenuineIntel", {"avx"}) == "Sandybridge"
    # AVX-512 without its VL/BW parts (Knights Landing) is not SkylakeX's set.
    assert best_core("GenuineIntel", {"avx", "avx2", "fma", "avx512f", "avx512cd"}) == "Haswell"
    assert best_core("GenuineIntel", {"sse3"}) == ""


def test_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse3 avx avx2 fma\n\n"
        "processor\t: 1\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu\n"
    )
    assert cpu_flags(str(info)) == ("AuthenticAMD", {"fpu", "sse3", "avx", "avx2", "fma"})
    assert cpu_flags(str(tmp_path / "missing")) == ("", set())


def test_an_operators_kernels_stand_and_openblas_can_pick_its_own() -> None:
    own = best_core(*cpu_flags())
    env: dict[str, str] = {}
    assert choose_blas_core("auto", env) == own
    assert env.get("OPENBLAS_CORETYPE", "") == own
    env = {"OPENBLAS_CORETYPE": "Prescott"}
    assert choose_blas_core("auto", env) == "Prescott"
    assert choose_blas_core("Haswell", env) == "Haswell"
    assert choose_blas_core("openblas", env) == "" and "OPENBLAS_CORETYPE" not in env


def test_malloc_settings() -> None:
    jemalloc = find_malloc("jemalloc")  # .ci/run installs libjemalloc2
    assert os.path.isfile(jemalloc) and "libjemalloc" in jemalloc
    assert find_malloc("auto") == jemalloc
    assert find_malloc("system") == ""
    assert find_malloc(jemalloc) == jemalloc
    with pytest.raises(ValueError, match="no such library"):
        find_malloc("/nonexistent/libnothing.so")


def test_node_environ_asks_for_a_restart_only_when_something_changes() -> None:
    jemalloc = find_malloc("jemalloc")
    env = node_environ("Haswell", "jemalloc", {"PATH": "/bin", "LD_PRELOAD": "/x/libother.so"})
    assert env == {"PATH": "/bin", "OPENBLAS_CORETYPE": "Haswell", "LD_PRELOAD": f"{jemalloc} /x/libother.so"}
    assert node_environ("Haswell", "jemalloc", env) is None  # the restarted process: nothing more to do
    assert node_environ("openblas", "system", {"PATH": "/bin"}) is None
    # An allocator preloaded already stands for auto; a setting of the operator's replaces it.
    tcmalloc = {"PATH": "/bin", "LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4 /x/libother.so"}
    assert node_environ("openblas", "auto", tcmalloc) is None
    assert node_environ("openblas", "system", tcmalloc) == {"PATH": "/bin", "LD_PRELOAD": "/x/libother.so"}
    assert node_environ("openblas", "jemalloc", tcmalloc) == {"PATH": "/bin", "LD_PRELOAD": f"{jemalloc} /x/libother.so"}
    assert node_environ("openblas", "system", {"LD_PRELOAD": jemalloc}) == {}


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_a_node_runs_on_the_chosen_kernels_and_jemalloc(tmp_path: Path) -> None:
    node = start_node(tmp_path, workers=1)
    try:
        said = re.search(r"recognition runs on OpenBLAS (\w+) kernels, (\S+)", node.log())
        assert said, node.log()[-2000:]
        # The tests' process chose for itself and its nodes alike (conftest.py).
        assert said.group(1) == os.environ.get("OPENBLAS_CORETYPE", said.group(1))
        assert said.group(2) == "jemalloc"
        # It started itself again in place: the pid its log names is the one the test started.
        assert f"farm up (pid {node.proc.pid})" in node.log()
        (worker,) = node.pids("worker")
        assert "libjemalloc" in _maps(worker)
        for role in ("broker", "ingress"):
            assert all("libjemalloc" in _maps(p) for p in node.pids(role)), role
        # What it says is Vosk's own decoding of what it heard, here on the same kernels.
        run = asyncio.run(run_call(node, DATA / "ko_02.wav", realtime=False))
        assert run.finals and same_transcript(run.finals, decode_heard(DATA / "ko_02.wav", run))
    finally:
        assert node.stop() == 0


def test_a_node_on_the_systems_malloc(tmp_path: Path) -> None:
    node = start_node(tmp_path, "--malloc", "system", "--blas-core", "Sandybridge", workers=1)
    try:
        assert "recognition runs on OpenBLAS Sandybridge kernels, the system's malloc" in node.log()
        (worker,) = node.pids("worker")
        assert "libjemalloc" not in _maps(worker)
    finally:
        assert node.stop() == 0


def test_kernels_openblas_does_not_know_are_said_to_be_refused(tmp_path: Path) -> None:
    node = start_node(tmp_path, "--blas-core", "NoSuchCore", workers=1)
    try:
        said = re.search(r"OpenBLAS did not take the kernels asked for \(NoSuchCore\): it runs (\w+)", node.log())
        assert said, node.log()[-2000:]
        assert f"recognition runs on OpenBLAS {said.group(1)} kernels" in node.log()
    finally:
        assert node.stop() == 0


def test_a_malloc_that_is_not_there_is_refused_before_the_start() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "farm.cli", "up", "--malloc", "/nonexistent/libnothing.so"],
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
    )
    assert done.returncode == 2
    assert "malloc '/nonexistent/libnothing.so': no such library" in done.stderr
