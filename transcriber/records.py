"""The transcriber's side of the Redis contract (DESIGN §3, v1): turn and session records.

Downstream services import these to read ``ns:turns`` and ``ns:sessions``::

    from transcriber.records import TurnRecord
    for _id, fields in entries:
        turn = TurnRecord.from_fields(fields)
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any


class EndReason(enum.StrEnum):
    INACTIVITY = "inactivity"
    END_OF_STREAM = "end_of_stream"
    MAX_DURATION = "max_duration"
    SHUTDOWN = "shutdown"
    ERROR = "error"
    SERVER_CLOSED = "server_closed"


@dataclass(frozen=True)
class WordRecord:
    text: str
    start: int  # ms of session audio
    end: int
    confidence: float


@dataclass(frozen=True)
class TurnRecord:
    device: str
    session: str
    turn: int
    final: bool
    text: str
    words: tuple[WordRecord, ...]
    start_ts: int  # capture time of the first word, epoch µs
    end_ts: int  # capture time of the last word, epoch µs
    eot_confidence: float

    @property
    def id(self) -> str:
        """Unique per final turn; consumers dedupe on it."""
        return f"{self.session}:{self.turn}"

    def to_fields(self) -> dict[str, str | int]:
        words = [{"text": w.text, "start": w.start, "end": w.end, "confidence": w.confidence}
                 for w in self.words]
        return {
            "id": self.id, "device": self.device, "session": self.session, "turn": self.turn,
            "final": 1 if self.final else 0, "text": self.text,
            "words": json.dumps(words, separators=(",", ":")),
            "start_ts": self.start_ts, "end_ts": self.end_ts,
            "eot_confidence": repr(float(self.eot_confidence)),
        }

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes] | dict[str, str]) -> TurnRecord:
        f = _as_text(fields)
        words = tuple(
            WordRecord(text=str(w["text"]), start=int(w["start"]), end=int(w["end"]),
                       confidence=float(w["confidence"]))
            for w in json.loads(f["words"])
        )
        return cls(device=f["device"], session=f["session"], turn=int(f["turn"]),
                   final=f["final"] == "1", text=f["text"], words=words,
                   start_ts=int(f["start_ts"]), end_ts=int(f["end_ts"]),
                   eot_confidence=float(f["eot_confidence"]))


@dataclass(frozen=True)
class SessionRecord:
    device: str
    session: str
    opened: int  # epoch µs
    closed: int  # epoch µs
    reason: EndReason
    billed_s: float  # Termination.session_duration_seconds, else the measured open time
    audio_s: float  # audio sent on this session
    close_code: int | None  # websocket close code, when one was received

    def to_fields(self) -> dict[str, str | int]:
        return {
            "device": self.device, "session": self.session, "opened": self.opened,
            "closed": self.closed, "reason": self.reason.value,
            "billed_s": f"{self.billed_s:.3f}", "audio_s": f"{self.audio_s:.3f}",
            "close_code": "" if self.close_code is None else self.close_code,
        }

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes] | dict[str, str]) -> SessionRecord:
        f = _as_text(fields)
        return cls(device=f["device"], session=f["session"], opened=int(f["opened"]),
                   closed=int(f["closed"]), reason=EndReason(f["reason"]),
                   billed_s=float(f["billed_s"]), audio_s=float(f["audio_s"]),
                   close_code=int(f["close_code"]) if f["close_code"] else None)


def _as_text(fields: dict[bytes, bytes] | dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in fields.items():
        k: Any = key.decode() if isinstance(key, bytes) else key
        v: Any = value.decode() if isinstance(value, bytes) else value
        out[k] = v
    return out
