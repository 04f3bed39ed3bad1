"""Any PCM (rate, channels, 8/16/24/32-bit) to the contract's 16 kHz mono s16le, in a stream.

Resampling is libsoxr's (``soxr.ResampleStream``): chunked output equals a one-shot
``soxr.resample`` of the whole signal. 16 kHz mono 16-bit input passes through untouched, so it
stays bit-exact.
"""

from __future__ import annotations

import numpy as np
import soxr

from capture.contract import CHANNELS, SAMPLE_RATE_HZ, SAMPLE_WIDTH_BYTES

SUPPORTED_WIDTHS = (1, 2, 3, 4)  # bytes per sample: 8-bit unsigned, 16/24/32-bit signed (WAV)


class PcmConverter:
    """Converts consecutive chunks of one signal; ``reset()`` after a discontinuity."""

    def __init__(self, rate: int, channels: int, sample_width: int) -> None:
        if sample_width not in SUPPORTED_WIDTHS:
            msg = f"{8 * sample_width}-bit samples are not supported"
            raise ValueError(msg)
        if rate <= 0 or channels <= 0:
            msg = f"bad format: {rate} Hz, {channels} channels"
            raise ValueError(msg)
        self.rate = rate
        self.channels = channels
        self.sample_width = sample_width
        self._frame_bytes = sample_width * channels
        self.passthrough = (rate, channels, sample_width) == (
            SAMPLE_RATE_HZ, CHANNELS, SAMPLE_WIDTH_BYTES)
        self._resampler = (
            soxr.ResampleStream(rate, SAMPLE_RATE_HZ, 1, dtype="float32", quality="HQ")
            if rate != SAMPLE_RATE_HZ else None
        )

    def convert(self, data: bytes) -> bytes:
        """16 kHz mono s16le for ``data`` (whole sample frames of the input format)."""
        if len(data) % self._frame_bytes:
            msg = f"{len(data)} bytes is not whole {self._frame_bytes}-byte frames"
            raise ValueError(msg)
        if self.passthrough:
            return bytes(data)
        mono = _to_float(data, self.sample_width).reshape(-1, self.channels).mean(axis=1)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono.astype(np.float32))
        return _to_s16le(mono)

    def flush(self) -> bytes:
        """What the resampler still holds (its filter delay); call once at the end of the signal."""
        if self._resampler is None:
            return b""
        tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._resampler.clear()
        return _to_s16le(tail)

    def reset(self) -> None:
        """Forget the resampler's history: the next chunk does not continue the previous one."""
        if self._resampler is not None:
            self._resampler.clear()


def _to_float(data: bytes, width: int) -> np.ndarray:
    """Samples scaled to [-1, 1): full scale of each width maps to 1.0."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if width == 1:  # WAV 8-bit is unsigned, centred on 128
        return (raw.astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    if width == 3:  # packed little-endian 24-bit: widen to int32 via the top three bytes
        wide = np.zeros((raw.size // 3, 4), dtype=np.uint8)
        wide[:, 1:] = raw.reshape(-1, 3)
        return (wide.view("<i4").reshape(-1) >> 8).astype(np.float64) / float(1 << 23)
    return np.frombuffer(data, dtype="<i4").astype(np.float64) / float(1 << 31)


def _to_s16le(samples: np.ndarray) -> bytes:
    scaled = np.rint(np.asarray(samples, dtype=np.float64) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype("<i2").tobytes()
