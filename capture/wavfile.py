"""WAV replay as a capture source: any PCM WAV, converted, at real time or as fast as possible."""

from __future__ import annotations

import logging
import struct
import sys
import threading
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from capture.convert import SUPPORTED_WIDTHS, PcmConverter
from capture.framing import Clock, Framer

log = logging.getLogger(__name__)

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE


class WavError(ValueError):
    """The file cannot be replayed: unreadable, not a WAV, or not integer PCM."""


@dataclass(frozen=True)
class WavInfo:
    rate: int
    channels: int
    sample_width: int
    frames: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.rate


class _WaveReader(wave.Wave_read):
    """``wave`` reader that also accepts WAVE_FORMAT_EXTENSIBLE with a PCM sub-format.

    sox, ffmpeg and most recorders write 24/32-bit and multichannel PCM that way; Python's
    ``wave`` accepts it only from 3.12 on, so only older versions use this override.
    """

    def _read_fmt_chunk(self, chunk: Any) -> None:
        head = chunk.read(16)
        if len(head) < 16:
            raise EOFError
        tag, channels, rate, _byte_rate, _align, bits = struct.unpack("<HHLLHH", head)
        if tag == _WAVE_FORMAT_EXTENSIBLE:
            ext = chunk.read(24)  # cbSize, valid bits, channel mask, sub-format GUID
            if len(ext) < 24:
                raise EOFError
            tag = struct.unpack_from("<H", ext, 8)[0]  # the GUID's first two bytes
        if tag != _WAVE_FORMAT_PCM:
            msg = f"unknown format: {tag}"
            raise wave.Error(msg)
        self._nchannels, self._framerate = channels, rate
        self._sampwidth = (bits + 7) // 8
        if not self._sampwidth or not self._nchannels:
            msg = "bad sample width or channel count"
            raise wave.Error(msg)
        self._framesize = self._nchannels * self._sampwidth
        self._comptype, self._compname = "NONE", "not compressed"


@contextmanager
def open_wav(path: Path) -> Iterator[tuple[wave.Wave_read, WavInfo]]:
    """An open reader and the file's format; raises WavError with a one-line reason."""
    try:
        handle: IO[bytes] = path.open("rb")
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror or exc}"
        raise WavError(msg) from None
    with handle:
        reader = _read_header(path, handle)
        try:
            yield reader, WavInfo(reader.getframerate(), reader.getnchannels(),
                                  reader.getsampwidth(), reader.getnframes())
        finally:
            reader.close()  # does not close ``handle``: wave closes only files it opened


def _read_header(path: Path, handle: IO[bytes]) -> wave.Wave_read:
    try:
        # wave.open on a file object: the caller's ``with`` closes the file
        reader = _WaveReader(handle) if sys.version_info < (3, 12) else wave.open(handle)  # noqa: SIM115
    except (wave.Error, EOFError, struct.error) as exc:
        reason = str(exc) or "truncated header"
        if reason.startswith("unknown format"):
            reason = f"not integer PCM ({reason}); convert it, e.g. sox in.wav -b 16 out.wav"
        msg = f"{path} is not a usable WAV file: {reason}"
        raise WavError(msg) from None
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror or exc}"
        raise WavError(msg) from None
    width, rate = reader.getsampwidth(), reader.getframerate()
    if width not in SUPPORTED_WIDTHS:
        msg = f"{path}: {8 * width}-bit samples are not supported (8, 16, 24 or 32-bit PCM)"
        raise WavError(msg)
    if not 1000 <= rate <= 768_000:
        msg = f"{path}: implausible sample rate {rate} Hz"
        raise WavError(msg)
    return reader


def probe_wav(path: Path) -> WavInfo:
    with open_wav(path) as (_reader, info):
        return info


class WavSource:
    """Replays a WAV into a Framer, 50 ms at a time.

    At real time, chunk k is handed over when its last sample "has been captured":
    ``start + (k + 1) * 50 ms`` on the injected monotonic clock, waited for with ``stop.wait``.
    """

    def __init__(self, path: Path, *, realtime: bool, clock: Clock) -> None:
        self.path = path
        self.realtime = realtime
        self._clock = clock
        self.description = f"file:{path.name}"

    def run(self, framer: Framer, stop: threading.Event) -> None:
        """Replay until the end of the file (then return) or until ``stop`` is set."""
        with open_wav(self.path) as (reader, info):
            self._replay(reader, info, framer, stop)

    def _replay(self, reader: wave.Wave_read, info: WavInfo, framer: Framer,
                stop: threading.Event) -> None:
        converter = PcmConverter(info.rate, info.channels, info.sample_width)
        chunk_frames = max(1, info.rate // 20)
        start = self._clock.monotonic()
        framer.start(start)
        log.info("replaying %s: %d Hz, %d ch, %d-bit, %.1f s%s", self.path.name, info.rate,
                 info.channels, 8 * info.sample_width, info.duration_s,
                 "" if self.realtime else ", as fast as possible")
        done = 0
        while not stop.is_set():
            try:
                data = reader.readframes(chunk_frames)
            except (wave.Error, EOFError, OSError) as exc:  # a file cut short mid-replay
                log.warning("stopped reading %s: %s", self.path.name, exc)
                break
            whole = len(data) - len(data) % (info.channels * info.sample_width)
            if not whole:
                break  # the end, or a trailing partial sample frame
            data = data[:whole]
            done += whole // (info.channels * info.sample_width)
            if self.realtime:
                delay = start + done / info.rate - self._clock.monotonic()
                if delay > 0 and stop.wait(delay):
                    break
            framer.write(converter.convert(data))
        framer.write(converter.flush())
