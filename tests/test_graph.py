"""``farm graph``: a model's lookahead pair composed ahead of time decodes exactly as the pair does.

Composing the default model's pair takes minutes and ~3.5 GB (bench/RESULTS.md records that
run and its transcripts), so these tests compile a model of the same acoustic model and
HCLr.fst with a small language model: a one-state loop over the words of the committed
sentences, in Gr.fst's own word numbering. The composition, the disambiguation symbols,
the words table and Vosk's loading of the static graph are the same code path. OpenFst's
tools come from Debian (.ci/run installs them).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from farm.config import default_model_dir
from farm.graph import GraphError, compile_graph, has_static_graph, lazy_graph_dir, tool_env

from .conftest import DATA, Node, decode_pcm, run_call, start_node


WAVS = ("ko_02.wav", "pause_06.wav", "ko_dialog_16k.wav")
PARTIAL_FRAMES = 10  # the default --partial-interval-ms 200, in 20 ms frames


def _words_of_the_sentences() -> list[str]:
    texts = json.loads((DATA / "texts.json").read_text())
    said = " ".join(v["orthographic"] for v in texts.values() if isinstance(v.get("orthographic"), str))
    # What the model heard in them (its own spelling), plus the scripted words it knows.
    heard = "네 맞 습니다 잠시 만 기다려 주세요 내 말을 한 염화실 오독 씩 더 입니다 오는 일 전반 은 을 했읍니다 유럽"
    return sorted(set(heard.split()) | set(said.split()))


def _small_lazy_model(into: Path) -> Path:
    """The default model with a one-state word loop as its Gr.fst (labels from Gr.fst's table)."""
    src = Path(default_model_dir() or "")
    env = tool_env()
    graph = into / "graph"
    graph.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name != "graph":
            (into / entry.name).symlink_to(entry)
    for entry in (src / "graph").iterdir():
        if entry.name != "Gr.fst":
            (graph / entry.name).symlink_to(entry)
    table = into / "words.all"
    subprocess.run(
        ["fstsymbols", f"--save_osymbols={table}", str(src / "graph" / "Gr.fst"), "/dev/null"],
        env=env,
        check=True,
        capture_output=True,
    )
    ids = dict(line.split("\t") for line in table.read_text(encoding="utf-8").splitlines() if "\t" in line)
    chosen = [w for w in _words_of_the_sentences() if w in ids]
    assert len(chosen) >= 10, chosen
    (graph / "words.txt").write_text(table.read_text(encoding="utf-8"), encoding="utf-8")
    arcs = "".join(f"0 0 {ids[w].strip()} {ids[w].strip()} {2.0 + i % 3}\n" for i, w in enumerate(chosen)) + "0\n"
    (into / "G.txt").write_text(arcs, encoding="ascii")
    subprocess.run(
        f"fstcompile G.txt | fstarcsort --sort_type=ilabel - {graph / 'Gr.fst'}",
        shell=True,
        cwd=into,
        env=env,
        check=True,
        capture_output=True,
    )
    return into


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    lazy = _small_lazy_model(tmp_path_factory.mktemp("lazy") / "model")
    static = tmp_path_factory.mktemp("static") / "model"
    compile_graph(str(lazy), str(static))
    return lazy, static


def _decode(model_dir: Path, wav: str) -> list[str]:
    """Vosk straight on a 16 kHz file with ``model_dir``: fresh recognizer, 20 ms frames,
    a partial every 10 frames."""
    with wave.open(str(DATA / wav), "rb") as w:
        assert w.getframerate() == 16000, wav
        pcm = w.readframes(w.getnframes())
    return decode_pcm(pcm, partial_every=PARTIAL_FRAMES, with_model=_loaded(str(model_dir)))


_LOADED: dict[str, Any] = {}


def _loaded(model_dir: str) -> Any:
    """A model as the farm loads it (dither 0: repeatable)."""
    import vosk

    from workers.engines.vosk import model_view

    vosk.SetLogLevel(-1)
    if model_dir not in _LOADED:
        _LOADED[model_dir] = vosk.Model(model_view(model_dir, tempfile.mkdtemp(prefix="farm-test-graph-")))
    return _LOADED[model_dir]


def test_the_compiled_graph_gives_the_lazy_pairs_transcripts(models: tuple[Path, Path]) -> None:
    lazy, static = models
    assert (static / "graph" / "HCLG.fst").exists()
    assert lazy_graph_dir(str(static)) is None and lazy_graph_dir(str(lazy)) == str(lazy / "graph")
    assert has_static_graph(str(static)) and not has_static_graph(str(lazy)) and not has_static_graph("")
    assert not (static / "graph" / "Gr.fst").exists(), "the pair is not carried along"
    said = []
    for wav in WAVS:
        want = _decode(lazy, wav)
        assert _decode(static, wav) == want, wav
        said += want
    assert said, "the small language model's words were heard"
    info = json.loads((static / "farm-graph.json").read_text())
    assert info["from"] == str(lazy) and info["bytes"] == (static / "graph" / "HCLG.fst").stat().st_size


@pytest.fixture(scope="module")
def static_node(models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_node(tmp_path_factory.mktemp("node"), "--no-gating", "--model", str(models[1]), workers=1)
    yield n
    assert n.stop() == 0


def test_a_node_on_a_compiled_graph_gives_vosks_own_finals(models: tuple[Path, Path], static_node: Node) -> None:
    wav = DATA / "ko_dialog_16k.wav"
    run = asyncio.run(run_call(static_node, wav, realtime=False, chunk_ms=20))
    assert run.finals == _decode(models[1], "ko_dialog_16k.wav")
    assert "static decoding graph" in static_node.log()


def test_what_cannot_be_compiled_is_refused_with_the_reason(
    models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lazy, static = models
    with pytest.raises(GraphError, match="a static graph already"):
        compile_graph(str(static), str(tmp_path / "again"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(GraphError, match="exists"):
        compile_graph(str(lazy), str(tmp_path / "taken"))
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(GraphError, match="apt-get install libfst-tools"):
        compile_graph(str(lazy), str(tmp_path / "no-tools"))
    assert not any(p.name.startswith(".farm-graph-") for p in tmp_path.iterdir()), "no half-written directory"


def test_farm_graph_says_why_it_cannot_compile(tmp_path: Path) -> None:
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "farm.cli", "graph", str(tmp_path / "out"), "--model", str(not_a_model)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "has no HCLr.fst, Gr.fst and disambig_tid.int" in proc.stderr
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == ["empty"]


def test_admission_counts_a_call_on_a_compiled_graph_at_what_it_costs_there(models: tuple[Path, Path]) -> None:
    from farm.config import CALL_CPU_MS_PRIOR, CALL_CPU_MS_PRIOR_STATIC_GRAPH, Config

    lazy, static = models
    assert Config(model=str(lazy)).call_cpu_ms_prior() == CALL_CPU_MS_PRIOR
    assert Config(model=str(static)).call_cpu_ms_prior() == CALL_CPU_MS_PRIOR_STATIC_GRAPH < CALL_CPU_MS_PRIOR
    assert Config(model=str(static), admission_call_cpu_ms=90).call_cpu_ms_prior() == 90


def test_farm_bench_rtf_measures_a_compiled_graph_beside_its_model(models: tuple[Path, Path], tmp_path: Path) -> None:
    lazy, static = models
    out = tmp_path / "rtf.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--rtf", "--rate", "16000", "--graph", str(static), "--out", str(out)],
        env={**os.environ, "FARM_MODEL": str(lazy)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{static} (the same transcripts)" in proc.stdout
    rows = json.loads(out.read_text())["settings"]
    assert [r["model"] for r in rows] == [str(lazy), str(static)]
    lazy_rtf, static_rtf = rows[0]["rtf"], rows[1]["rtf"]
    assert lazy_rtf["texts"] == static_rtf["texts"] and any(lazy_rtf["texts"])
    assert lazy_rtf["cer"] == static_rtf["cer"] and static_rtf["rtf_speech"] > 0
