"""``farm graph``: compile a Vosk model's decoding graph once, instead of in every recognizer.

Vosk's small models ship a lookahead pair, ``HCLr.fst`` and ``Gr.fst``, and every
recognizer composes them on the fly as it decodes (``LookaheadComposeFst``), with a cache
of its own that is forgotten when the recognizer is. At 12 calls that composition was
78 % of a worker's CPU and most of its memory (bench/results/profile-12calls.md).

This command composes the pair once, with the same lookahead filter OpenFst picks for
the lazy composition and the same removal of the disambiguation symbols, into a static
``graph/HCLG.fst``: the graph the recognizers would have expanded, so the transcripts are
the same (tests/test_graph.py), for a tenth of the CPU (bench/RESULTS.md). The result is
a model directory like any other (``farm up --model DIR``); Vosk loads HCLG.fst in place
of the pair, once per node, before the workers fork, so they share it.

The composition runs OpenFst's own command-line tools with their ``ngram`` and
``olabel_lookahead`` FST types (Debian: ``libfst-tools`` and ``libfst22-plugins-base``).
The symbol tables are left out of the graph (OpenFst 1.7 cannot read back the model's
words table once written into a composed FST) and written as ``graph/words.txt``, which
Vosk reads when the graph has none.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


__all__ = ["GraphError", "add_parser", "compile_graph", "has_static_graph", "lazy_graph_dir", "run", "tool_env"]

log = logging.getLogger("farm.graph")

TOOLS = ("fstsymbols", "fstcompose", "fstrelabel", "fstconvert")
PLUGIN = "ngram-fst.so"  # one of the FST type plugins the model's files need
PLUGIN_DIRS = ("/usr/lib/*/fst/*", "/usr/lib/*/fst", "/usr/local/lib/fst", "/usr/lib/fst")
_LAZY = ("HCLr.fst", "Gr.fst", "disambig_tid.int")  # what the static graph replaces


class GraphError(Exception):
    """Why a graph cannot be compiled, in words an operator can act on."""


@dataclass(frozen=True)
class Compiled:
    out: str
    seconds: float
    graph_bytes: int


def lazy_graph_dir(model: str) -> str | None:
    """The directory of ``model`` holding the pair composed on the fly, or None when the
    model has a static graph already or no graph farm knows."""
    for graph in (os.path.join(model, "graph"), model):  # Vosk's two model layouts
        if os.path.exists(os.path.join(graph, "HCLG.fst")):
            return None
        if all(os.path.exists(os.path.join(graph, name)) for name in _LAZY):
            return graph
    return None


def has_static_graph(model: str) -> bool:
    """Whether ``model`` decodes with a graph compiled ahead of time (by farm graph, or shipped so)."""
    return any(os.path.exists(os.path.join(model, sub, "HCLG.fst")) for sub in ("graph", "")) if model else False


def tool_env() -> dict[str, str]:
    """The environment the tools need: OpenFst finds a type's plugin on the library path."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise GraphError(
            f"OpenFst's tools are not installed ({', '.join(missing)} missing): "
            "apt-get install libfst-tools libfst22-plugins-base"
        )
    env = dict(os.environ)
    have = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    if not any(os.path.exists(os.path.join(p, PLUGIN)) for p in have):
        found = sorted({os.path.dirname(p) for d in PLUGIN_DIRS for p in glob.glob(os.path.join(d, PLUGIN))})
        if not found:
            raise GraphError(
                f"OpenFst's FST type plugins are not installed (no {PLUGIN}): apt-get install libfst22-plugins-base"
            )
        env["LD_LIBRARY_PATH"] = ":".join([found[-1], *have])
    return env


def _run(cmd: str, env: dict[str, str], cwd: str) -> None:
    proc = subprocess.run(["sh", "-c", f"set -e; {cmd}"], env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0 or "ERROR" in proc.stderr:
        raise GraphError(f"{cmd.split()[0]} failed: {proc.stderr.strip()[-800:] or f'exit {proc.returncode}'}")


def compile_graph(model: str, out: str) -> Compiled:
    """Write into ``out`` (which must not exist) ``model`` with its graph composed ahead of time."""
    model = os.path.abspath(model)
    out = os.path.abspath(out)
    graph = lazy_graph_dir(model)
    if graph is None:
        raise GraphError(f"{model} has no HCLr.fst, Gr.fst and disambig_tid.int to compose (a static graph already?)")
    if os.path.exists(out):
        raise GraphError(f"{out} exists: farm graph writes a new directory")
    env = tool_env()
    t0 = time.monotonic()
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".farm-graph-", dir=parent)  # same filesystem: renamed into place at the end
    try:
        # Everything but the pair comes along as it is (acoustic model, features, i-vectors, phones).
        shutil.copytree(model, os.path.join(work, "model"), ignore=lambda d, names: [n for n in names if n in _LAZY])
        target = os.path.join(work, "model", os.path.relpath(graph, model))
        with open(os.path.join(graph, "disambig_tid.int"), encoding="ascii") as f:
            disambig = [line.split()[0] for line in f if line.strip()]
        with open(os.path.join(work, "disambig.pairs"), "w", encoding="ascii") as f:
            f.writelines(f"{tid} 0\n" for tid in disambig)  # what LookaheadComposeFst maps to epsilon
        q = {
            k: shlex.quote(v)
            for k, v in {
                "g": os.path.join(graph, "Gr.fst"),
                "hcl": os.path.join(graph, "HCLr.fst"),
                "words": os.path.join(target, "words.txt"),
                "hclg": os.path.join(target, "HCLG.fst"),
            }.items()
        }
        log.info("farm graph: the words table and a symbol-free copy of %s", q["g"])
        # A model that has its own words.txt keeps it (its Gr.fst may carry no table at all).
        save = "" if os.path.exists(os.path.join(target, "words.txt")) else f"--save_osymbols={q['words']} "
        _run(f"fstsymbols {save}--clear_isymbols --clear_osymbols {q['g']} G.fst", env, work)
        # --connect=false: the lazy composition does not trim dead ends either, and the
        # decoder's pruning sees the same states.
        log.info("farm graph: composing %s with G (minutes, a few GB of memory)", q["hcl"])
        _run(
            f"fstcompose --connect=false {q['hcl']} G.fst | fstrelabel --relabel_ipairs=disambig.pairs "
            f"| fstconvert --fst_type=const - {q['hclg']}",
            env,
            work,
        )
        seconds = time.monotonic() - t0
        size = os.path.getsize(os.path.join(target, "HCLG.fst"))
        with open(os.path.join(work, "model", "farm-graph.json"), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "from": model,
                    "graph": os.path.relpath(target, os.path.join(work, "model")),
                    "seconds": round(seconds, 1),
                    "bytes": size,
                },
                f,
                indent=1,
            )
        os.rename(os.path.join(work, "model"), out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Compiled(out, seconds, size)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = sub.add_parser(
        "graph",
        help="compile a model's decoding graph once (a tenth of the CPU per call); then farm up --model OUT",
        description="Compose a Vosk model's HCLr.fst and Gr.fst into a static graph/HCLG.fst in a new model "
        "directory OUT: the same transcripts for a tenth of the recognition CPU. Needs OpenFst's tools "
        "(Debian: libfst-tools libfst22-plugins-base); the Korean default model takes ~2 min and ~3.5 GB.",
    )
    g.add_argument("out", metavar="OUT", help="the model directory to write (must not exist)")
    g.add_argument("--model", default=None, help="the model to compile (default: the model farm up uses)")


def run(args: argparse.Namespace) -> int:
    """``farm graph``; ``args.model`` is the default model's directory when not given (farm/cli.py)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = args.model
    if not model:
        print("farm graph: no model given and no default model installed (--model DIR)", file=sys.stderr)
        return 2
    try:
        done = compile_graph(model, args.out)
    except GraphError as exc:
        print(f"farm graph: {exc}", file=sys.stderr)
        return 1
    size_mb = done.graph_bytes / 1e6
    print(f"{done.out}: graph/HCLG.fst {size_mb:.0f} MB in {done.seconds:.0f} s; farm up --model {done.out}")
    return 0
