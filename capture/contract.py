"""The audio side of the Redis contract (DESIGN §3, v1): key names, frame entries, device records.

Capture writes these; the transcriber reads them through the decoders here, so both sides agree
by construction. Keys of one device share the ``{dev}`` Redis Cluster hash tag.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

SAMPLE_RATE_HZ = 16_000
CHANNELS = 1
SAMPLE_FORMAT = "s16le"
SAMPLE_WIDTH_BYTES = 2
FRAME_MS = 50
FRAME_SAMPLES = SAMPLE_RATE_HZ * FRAME_MS // 1000  # 800
FRAME_BYTES = FRAME_SAMPLES * SAMPLE_WIDTH_BYTES * CHANNELS  # 1600
FRAME_US = FRAME_MS * 1000

DEFAULT_NAMESPACE = "edgescribe:"
DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# A registry heartbeat is due at least this often (DESIGN §3: "at least every 5 s").
HEARTBEAT_INTERVAL_S = 5.0


class MalformedEntry(ValueError):
    """A stream entry or registry value that does not follow the contract.

    ``kind`` is a short, bounded label (safe as a metric label and for log-once).
    """

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        super().__init__(f"{kind}: {detail}")


def is_valid_device_id(device_id: str) -> bool:
    return DEVICE_ID_PATTERN.fullmatch(device_id) is not None


@dataclass(frozen=True)
class Keys:
    """Every Redis key edgescribe uses, under one namespace."""

    namespace: str = DEFAULT_NAMESPACE

    def audio(self, device_id: str) -> str:
        return f"{self.namespace}audio:{{{device_id}}}"

    @property
    def devices(self) -> str:
        return f"{self.namespace}devices"

    @property
    def turns(self) -> str:
        return f"{self.namespace}turns"

    @property
    def sessions(self) -> str:
        return f"{self.namespace}sessions"

    def device_of_audio_key(self, key: str) -> str | None:
        prefix, suffix = f"{self.namespace}audio:{{", "}"
        if key.startswith(prefix) and key.endswith(suffix):
            return key[len(prefix):-len(suffix)]
        return None


@dataclass(frozen=True)
class AudioFrame:
    run: str
    seq: int
    ts_us: int
    pcm: bytes
    rate: int = SAMPLE_RATE_HZ
    channels: int = CHANNELS
    fmt: str = SAMPLE_FORMAT

    @property
    def duration_us(self) -> int:
        return len(self.pcm) * 1_000_000 // (SAMPLE_WIDTH_BYTES * self.channels * self.rate)

    def to_fields(self) -> dict[str, str | int | bytes]:
        return {"run": self.run, "seq": self.seq, "ts": self.ts_us, "rate": self.rate,
                "ch": self.channels, "fmt": self.fmt, "pcm": self.pcm}


@dataclass(frozen=True)
class EndOfStream:
    run: str
    seq: int
    ts_us: int

    def to_fields(self) -> dict[str, str | int | bytes]:
        return {"run": self.run, "seq": self.seq, "ts": self.ts_us, "eos": 1}


# The largest frame a reader accepts: anything bigger is hostile or a bug, not audio.
MAX_FRAME_BYTES = SAMPLE_RATE_HZ * SAMPLE_WIDTH_BYTES * 2  # 2 s at 16 kHz mono


def decode_entry(fields: dict[bytes, bytes]) -> AudioFrame | EndOfStream:
    """Decode one ``ns:audio:{dev}`` entry as redis-py returns it (bytes keys and values)."""
    run = _text(fields, b"run")
    seq = _int(fields, b"seq")
    ts_us = _int(fields, b"ts")
    if seq < 0:
        raise MalformedEntry("bad_seq", f"seq {seq} is negative")
    if fields.get(b"eos") is not None:
        return EndOfStream(run=run, seq=seq, ts_us=ts_us)
    rate = _int(fields, b"rate")
    channels = _int(fields, b"ch")
    fmt = _text(fields, b"fmt")
    pcm = fields.get(b"pcm")
    if pcm is None:
        raise MalformedEntry("missing_field", "no pcm")
    if rate != SAMPLE_RATE_HZ or channels != CHANNELS or fmt != SAMPLE_FORMAT:
        raise MalformedEntry("bad_format",
                             f"{rate} Hz, {channels} ch, {fmt}: expected 16000/1/s16le")
    if not pcm or len(pcm) % (SAMPLE_WIDTH_BYTES * channels):
        raise MalformedEntry("bad_pcm", f"{len(pcm)} bytes is not whole samples")
    if len(pcm) > MAX_FRAME_BYTES:
        raise MalformedEntry("oversized", f"{len(pcm)} bytes")
    return AudioFrame(run=run, seq=seq, ts_us=ts_us, pcm=pcm, rate=rate, channels=channels, fmt=fmt)


@dataclass(frozen=True)
class DeviceRecord:
    """The ``ns:devices`` hash value: who is capturing, since when, last heard of when."""

    run: str
    rate: int
    channels: int
    started: float
    seen: float
    source: str = ""

    def to_json(self) -> str:
        return json.dumps({"run": self.run, "rate": self.rate, "ch": self.channels,
                           "started": round(self.started, 3), "seen": round(self.seen, 3),
                           "source": self.source}, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> DeviceRecord:
        try:
            data: Any = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise MalformedEntry("bad_json", "registry value is not JSON") from None
        if not isinstance(data, dict):
            raise MalformedEntry("bad_json", "registry value is not an object")
        try:
            return cls(run=str(data["run"]), rate=int(data["rate"]), channels=int(data["ch"]),
                       started=float(data["started"]), seen=float(data["seen"]),
                       source=str(data.get("source", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEntry("bad_record", f"registry value lacks or mistypes {exc}") from None


def _text(fields: dict[bytes, bytes], name: bytes) -> str:
    raw = fields.get(name)
    if raw is None:
        raise MalformedEntry("missing_field", f"no {name.decode()}")
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedEntry("bad_field", f"{name.decode()} is not ASCII") from None


def _int(fields: dict[bytes, bytes], name: bytes) -> int:
    text = _text(fields, name)
    try:
        return int(text)
    except ValueError:
        detail = f"{name.decode()}={text[:20]!r} is not an integer"
        raise MalformedEntry("bad_field", detail) from None
