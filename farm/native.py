"""The native code under Vosk: which OpenBLAS kernels and which malloc a node runs with.

``libvosk.so`` carries OpenBLAS with a kernel set per x86 generation and picks one at load
from the CPU's model number. A CPU it does not know (a hypervisor's generic "Intel Xeon
Processor", a newer part than the wheel's OpenBLAS) gets Prescott's SSE3 kernels, whatever
AVX the CPU has. ``OPENBLAS_CORETYPE`` names the set instead; OpenBLAS reads it once, when
the library loads, so it is chosen here from the CPU's flags before anything imports vosk.

Kaldi's decoder allocates a token per arc it keeps, from 3 recognition threads per worker
sharing 2 glibc arenas (workers/engines/vosk.py: ``limit_malloc_arenas``); jemalloc serves
the same allocations from per-thread caches. A preloaded allocator must be there when the
process starts, so ``farm up`` starts itself again with ``LD_PRELOAD`` (:func:`node_environ`)
and every process of the node inherits it (bench/RESULTS.md: the on/off pairs).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Mapping, MutableMapping


__all__ = [
    "cpu_flags",
    "best_core",
    "choose_blas_core",
    "find_malloc",
    "node_environ",
    "loaded_core",
    "loaded_malloc",
    "describe",
]

# The kernel set each generation's flags allow, best first (OpenBLAS's names, as
# OPENBLAS_CORETYPE takes them; SkylakeX is its AVX-512 set, Zen its AVX2 set for AMD).
_AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
_MALLOCS = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}
_LDCONFIG = ("/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig")


def cpu_flags(path: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """The first CPU's vendor id and flags (empty where /proc/cpuinfo cannot be read)."""
    vendor, flags = "", set[str]()
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    vendor = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return vendor, flags


def best_core(vendor: str, flags: set[str]) -> str:
    """The best OpenBLAS kernel set these flags run ("" when nothing beyond SSE3 is known)."""
    if _AVX512 <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Zen" if vendor == "AuthenticAMD" else "Haswell"
    if "avx" in flags:
        return "Sandybridge"
    return ""


def choose_blas_core(setting: str = "auto", environ: MutableMapping[str, str] = os.environ) -> str:
    """Set ``OPENBLAS_CORETYPE`` in ``environ`` for ``setting`` and return what it holds.

    ``auto``: the best set this CPU's flags allow, unless the variable is set already (an
    operator's choice stands); ``openblas``: OpenBLAS's own pick (the variable removed); any
    other value is a core name for OpenBLAS. Call before vosk is imported.
    """
    if setting == "openblas":
        environ.pop("OPENBLAS_CORETYPE", None)
    elif setting != "auto":
        environ["OPENBLAS_CORETYPE"] = setting
    elif "OPENBLAS_CORETYPE" not in environ:
        core = best_core(*cpu_flags())
        if core:
            environ["OPENBLAS_CORETYPE"] = core
    return environ.get("OPENBLAS_CORETYPE", "")


def _ldconfig_path(soname: str) -> str:
    """Where the dynamic linker finds ``soname`` ("" when it does not)."""
    for tool in _LDCONFIG:
        try:
            out = subprocess.run([tool, "-p"], capture_output=True, text=True, timeout=10, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for line in out.splitlines():
            name, _, where = line.strip().partition(" => ")
            if name.split(" ", 1)[0] == soname and os.path.isfile(where):
                return where
        break  # the first ldconfig that runs has the cache
    return ""


def find_malloc(setting: str) -> str:
    """The library to preload for ``setting`` ("" for the system's malloc).

    ``auto``: jemalloc where it is installed, else the system's; ``jemalloc`` or ``tcmalloc``:
    that one, or ValueError; ``system``: none; a path: that file, or ValueError.
    """
    if setting == "system":
        return ""
    if setting in ("auto", *_MALLOCS):
        path = _ldconfig_path(_MALLOCS["jemalloc" if setting == "auto" else setting])
        if not path and setting != "auto":
            package = "libjemalloc2" if setting == "jemalloc" else "libtcmalloc-minimal4"
            raise ValueError(f"malloc {setting}: {_MALLOCS[setting]} is not installed (apt-get install {package})")
        return path
    if not os.path.isfile(setting):
        raise ValueError(f"malloc {setting!r}: no such library (auto, jemalloc, tcmalloc, system or a path)")
    return setting


def node_environ(blas_core: str, malloc: str, environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment ``farm up`` must start itself again with for these settings, or None
    when this process already has it. Raises ValueError for a malloc that is not there."""
    env = dict(environ)
    choose_blas_core(blas_core, env)
    preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    mallocs = [p for p in preload if os.path.basename(p).startswith(tuple(f"lib{m}" for m in _MALLOCS))]
    if not (malloc == "auto" and mallocs):  # for auto, an allocator preloaded already stands
        library = find_malloc(malloc)
        preload = ([library] if library else []) + [p for p in preload if p not in mallocs]
        if preload:
            env["LD_PRELOAD"] = " ".join(preload)
        else:
            env.pop("LD_PRELOAD", None)
    return None if env == dict(environ) else env


def _loaded(fragment: str) -> str:
    """The path of a library mapped into this process whose name holds ``fragment``."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.split(None, 5)[-1].strip()
                if fragment in os.path.basename(path):
                    return path
    except OSError:
        pass
    return ""


def loaded_core() -> str:
    """The kernel set the OpenBLAS in this process's libvosk runs ("" before vosk is loaded)."""
    libvosk = _loaded("libvosk")
    if not libvosk:
        return ""
    lib = ctypes.CDLL(libvosk)  # the copy already loaded: dlopen hands back its handle
    lib.gotoblas_corename.restype = ctypes.c_char_p
    return (lib.gotoblas_corename() or b"?").decode()


def loaded_malloc() -> str:
    """The preloaded allocator this process runs on ("jemalloc"; "" for the system's)."""
    return next((name for name in _MALLOCS if _loaded(f"lib{name}")), "")


def describe(core: str, malloc: str) -> str:
    """``loaded_core()`` and ``loaded_malloc()`` in words: "OpenBLAS SkylakeX kernels, jemalloc"."""
    return f"OpenBLAS {core or '?'} kernels, " + (malloc or "the system's malloc")
