"""The ingress process: uvloop, the call registry and the sites, drained on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os

from farm.config import Config
from farm.ingress.agent import AgentSite
from farm.ingress.audio_stream import AudioStreamSite
from farm.ingress.calls import CallRegistry
from farm.ingress.canary import start_canary
from farm.ingress.commands import CommandServer
from farm.ingress.esl_inbound import InboundEsl
from farm.ingress.http_transcribe import start_site as start_http_site
from farm.ingress.metrics import Metrics
from farm.ingress.socket_audio import SocketAudioSite
from farm.ingress.vosk_server import start_site as start_vosk_site
from farm.lifeline import die_with_parent, obey_supervisor_only, orphaned, parent_from_env
from farm.limits import raise_open_files_limit
from farm.proctitle import name_process
from farm.tls import CertificateFiles, server_context


__all__ = ["main", "serve"]

log = logging.getLogger("farm.ingress")


async def serve(config: Config) -> None:
    metrics = Metrics()
    registry = CallRegistry(config, metrics)
    registry.start()
    inbound = (
        InboundEsl(config.esl_inbound, config.esl_password, config.esl_max_body_bytes) if config.esl_inbound else None
    )
    if inbound is not None:
        inbound.start()
    # The Event Socket port and the command endpoint are bound before the mod_audio_stream
    # WebSocket port opens: the supervisor takes that port being open to mean they are bound
    # too (failing to bind one ends the ingress first). Only the optional vosk port comes later.
    socket_site = SocketAudioSite(config, registry, metrics) if config.esl_port else None
    if socket_site is not None:
        await socket_site.start()
    commands = CommandServer(config, registry)
    commands.start()
    tls = server_context(config.tls_cert, config.tls_key)  # checked by `farm up`
    site = AudioStreamSite(config, registry, metrics, inbound, tls)
    agent = AgentSite(config, registry, lambda: site.draining)
    await agent.start()  # before the WebSocket port: that port open means all are bound
    await site.start()
    vosk_site = await start_vosk_site(config, registry, metrics, tls)
    http_site = await start_http_site(config, registry, tls)
    canary = start_canary(config, registry, metrics)
    renewals = None
    if tls is not None:  # a renewed certificate is taken without a restart
        renewals = asyncio.create_task(CertificateFiles(tls, config.tls_cert, config.tls_key).watch(), name="tls")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    parent = parent_from_env()
    # Also sent when the supervisor dies (the lifeline).
    loop.add_signal_handler(obey_supervisor_only(parent), stop.set)
    watch = asyncio.create_task(_watch_parent(parent, stop), name="lifeline")
    scheme = "wss" if tls else "ws"
    log.info(
        "ingress ready (pid %d): mod_audio_stream on %s://%s:%d/<call-id>",
        os.getpid(),
        scheme,
        config.ws_host,
        site.port,
    )
    if socket_site is not None:
        log.info(
            "ingress ready (pid %d): mod_socket_audio via 'socket %s:%d async full'",
            os.getpid(),
            config.esl_host,
            socket_site.port,
        )
    log.info("ingress ready (pid %d): play/flush commands on %s", os.getpid(), config.commands)
    await stop.wait()
    watch.cancel()
    if renewals is not None:
        renewals.cancel()
    if canary is not None:
        canary.cancel()  # a probe in flight ends with the others; none starts
    # Without a supervisor the workers are going too: nobody would finish an utterance.
    drain_s = 0.0 if orphaned(parent) else config.drain_timeout
    if drain_s:
        log.info(
            "ingress draining (pid %d): no new calls, waiting up to %.0f s for utterances in flight",
            os.getpid(),
            drain_s,
        )
    else:
        log.warning("supervisor (pid %d) is gone: ingress closing every call now (pid %d)", parent, os.getpid())
    if http_site is not None:
        http_site.draining = True  # new POSTs get 503; those in flight finish with their calls
    drains = [site.drain(drain_s)]
    if socket_site is not None:
        drains.append(socket_site.drain(drain_s))
    if vosk_site is not None:
        drains.append(vosk_site.drain(drain_s))
    await asyncio.gather(*drains)
    agent.close()  # said "drain" until now
    commands.close()
    if inbound is not None:
        inbound.close()
    await registry.wait_all_done(timeout=10.0 if drain_s else 0.0)
    if http_site is not None:
        http_site.close()
    if registry.sink is not None:
        await registry.sink.close()  # the last calls' call_end into the stream
    registry.close_all()
    log.info("ingress stopped (pid %d)", os.getpid())


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """The lifeline's second way: notice a supervisor gone where no signal said so."""
    while not orphaned(parent):
        await asyncio.sleep(1.0)
    stop.set()


def main() -> None:
    from farm.logs import setup_logging

    if not die_with_parent(parent_from_env()):
        return  # the supervisor died while starting us
    config = Config.from_env()
    setup_logging(config.log_level, "ingress")
    name_process("ingress")
    raise_open_files_limit()  # every call is a socket and a ring here
    import uvloop

    uvloop.run(serve(config))


if __name__ == "__main__":
    main()
