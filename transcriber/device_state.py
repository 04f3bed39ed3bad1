"""The vocabulary of a device's lifecycle: its states, its inbox messages, its open session."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from capture.contract import AudioFrame, EndOfStream, MalformedEntry
from transcriber.aai.events import Termination
from transcriber.aai.turns import FinalTurnFilter
from transcriber.audio import Timeline
from transcriber.connection import Connection
from transcriber.records import EndReason


class State(enum.Enum):
    IDLE = "idle"
    WAITING = "waiting"  # for backoff or the new-session budget
    CONNECTING = "connecting"
    OPEN = "open"
    TERMINATING = "terminating"


@dataclass(frozen=True)
class Frames:
    """Entries read from the device's stream, in order."""

    items: list[tuple[bytes, AudioFrame | EndOfStream | MalformedEntry]]


@dataclass(frozen=True)
class Stop:
    """End the device's work: terminate any session with ``reason``, then finish."""

    reason: EndReason


@dataclass
class OpenSession:
    connection: Connection
    timeline: Timeline
    finals: FinalTurnFilter
    session_id: str = ""
    opened_wall_us: int = 0
    opened_at: float = 0.0
    audio_sent_ms: int = 0
    expires_at: float | None = None
    end_reason: EndReason | None = None
    terminate_deadline: float = 0.0
    termination: Termination | None = None
    close_code: int | None = None
