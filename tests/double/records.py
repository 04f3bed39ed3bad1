"""What the double saw and did, per connection: the live (locked) state and frozen snapshots."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LiveRecord:
    """Mutated on the server's loop thread under the server's condition lock."""

    index: int
    path: str
    query: list[tuple[str, str]]
    authorization: str | None
    user_agent: str | None
    connected_at: float
    accepted: bool = False
    session_id: str | None = None
    behaviour: str | None = None
    audio: bytearray = field(default_factory=bytearray)
    audio_messages: int = 0
    received: list[str] = field(default_factory=list)
    control: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    begin_at: float | None = None
    terminate_at: float | None = None
    closed_at: float | None = None
    close_code: int | None = None
    close_reason: str = ""
    closed_by: str | None = None

    def snapshot(self) -> SessionRecord:
        return SessionRecord(
            index=self.index, path=self.path, query=tuple(self.query),
            authorization=self.authorization, user_agent=self.user_agent,
            accepted=self.accepted, session_id=self.session_id, behaviour=self.behaviour,
            audio=bytes(self.audio), audio_messages=self.audio_messages,
            received=tuple(self.received),
            control=tuple(json.loads(json.dumps(m)) for m in self.control),
            sent=tuple(json.loads(json.dumps(m)) for m in self.sent),
            connected_at=self.connected_at, begin_at=self.begin_at,
            terminate_at=self.terminate_at, closed_at=self.closed_at,
            close_code=self.close_code, close_reason=self.close_reason,
            closed_by=self.closed_by,
        )


@dataclass(frozen=True)
class SessionRecord:
    """One connection as the double saw it. Times are ``time.monotonic()``.

    ``received``: ``"audio"`` per binary message, the ``type`` of each text message, or
    ``"invalid"``. ``sent``: every message the double sent, decoded. ``closed_by``:
    ``"server"`` (the double closed with ``close_code``), ``"client"`` (the client's close
    code), ``"drop"`` (the double cut TCP), ``"http"`` (refused before the upgrade, with
    ``close_code`` = the HTTP status) or None while open.
    """

    index: int
    path: str
    query: tuple[tuple[str, str], ...]
    authorization: str | None = field(repr=False)
    user_agent: str | None
    accepted: bool
    session_id: str | None
    behaviour: str | None
    audio: bytes = field(repr=False)
    audio_messages: int
    received: tuple[str, ...] = field(repr=False)
    control: tuple[dict[str, Any], ...] = field(repr=False)
    sent: tuple[dict[str, Any], ...] = field(repr=False)
    connected_at: float
    begin_at: float | None
    terminate_at: float | None
    closed_at: float | None
    close_code: int | None
    close_reason: str
    closed_by: str | None

    @property
    def params(self) -> dict[str, str]:
        return dict(self.query)

    @property
    def terminate_received(self) -> bool:
        return self.terminate_at is not None

    def audio_seconds(self, bytes_per_second: int = 32000) -> float:
        return len(self.audio) / bytes_per_second

    def sent_types(self) -> list[str]:
        return [str(m.get("type")) for m in self.sent]

    def turns(self, *, end_of_turn: bool | None = None) -> list[dict[str, Any]]:
        return [m for m in self.sent if m.get("type") == "Turn"
                and (end_of_turn is None or m["end_of_turn"] is end_of_turn)]

    def final_transcripts(self) -> list[str]:
        """Transcripts of the end-of-turn messages (formatted one when there are two)."""
        by_order: dict[int, str] = {}
        for message in self.turns(end_of_turn=True):
            if message["turn_order"] not in by_order or message["turn_is_formatted"]:
                by_order[message["turn_order"]] = message["transcript"]
        return [by_order[k] for k in sorted(by_order)]
