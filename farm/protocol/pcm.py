"""Raw PCM as every ingress receives it: int16 LE samples in chunks of any size.

What the audio protocols share (PROTOCOLS.md §1.4, §1.7, §2.2): the sample rates
farm serves, and the carry that turns arbitrary chunks into whole sample frames.
"""

from __future__ import annotations


__all__ = ["SUPPORTED_RATES", "SampleCarry"]

# mod_audio_stream accepts any multiple of 8000 (PROTOCOLS.md §1.2); webrtcvad and
# soxr cover these. 44.1 kHz is refused by the module itself.
SUPPORTED_RATES = (8000, 16000, 24000, 32000, 48000)


class SampleCarry:
    """Turns arbitrary binary chunks into whole sample frames, carrying the rest.

    A chunk may end in the middle of a sample (odd byte count) or of a stereo pair;
    the tail waits for the next chunk instead of shifting every later sample.
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        """The whole frames of what came so far; call once per chunk, in order."""
        if self._tail:
            chunk = self._tail + chunk
        cut = len(chunk) - len(chunk) % self.width
        self._tail = chunk[cut:]
        return chunk[:cut]

    @property
    def pending(self) -> int:
        """Bytes held back for the next chunk (fewer than ``width``)."""
        return len(self._tail)
