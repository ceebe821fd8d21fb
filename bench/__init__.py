"""The bench harness: emulated FreeSWITCH calls against a farm (or vosk-server), per-stage latency.

One concept per module:

- :mod:`bench.audio`: dialer-like call scripts from the fixtures, with known speech spans;
- :mod:`bench.senders`: one class per wire protocol (amigniter, sptmru, vosk, socket_audio);
- :mod:`bench.measure`: what a call sent and received -> latency samples per stage, real-time verdict;
- :mod:`bench.stats`: percentiles and terminal tables;
- :mod:`bench.procs`: CPU and memory of the server's processes;
- :mod:`bench.run`: a step of N calls, the ramp, a farm to test;
- :mod:`bench.report`, :mod:`bench.plots`: terminal report, JSON, PNGs (matplotlib, lazily);
- :mod:`bench.rtf`: the model's single-stream real-time factor and the physical limit;
- :mod:`bench.compare`: farm vs vosk-server, rewrites RESULTS.md;
- :mod:`bench.cli`: ``farm bench`` / ``python -m bench``;
- :mod:`bench.fs_peer` and its ``bench.fs_peer_*`` parts: a FreeSWITCH peer (Event Socket +
  mod_socket_audio) for the socket_audio sender and the tests; its docstring maps the parts.
"""
