"""Server messages of Universal Streaming v3 as frozen dataclasses.

Extra fields are tolerated (the API adds them often); each event keeps the decoded message in
``raw`` for debugging. Unknown message types parse to ``None`` (logged once per type).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from transcriber.aai.errors import ProtocolError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Begin:
    id: str
    expires_at: int
    """Unix seconds."""
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class SpeechStarted:
    timestamp_ms: int
    """Milliseconds of session audio."""
    confidence: float
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Word:
    text: str
    start_ms: int
    end_ms: int
    confidence: float
    word_is_final: bool


@dataclass(frozen=True)
class Turn:
    turn_order: int
    transcript: str
    end_of_turn: bool
    turn_is_formatted: bool
    end_of_turn_confidence: float
    words: tuple[Word, ...]
    utterance: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Termination:
    audio_duration_seconds: float | None
    session_duration_seconds: float | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class ServerError:
    """The ``Error`` frame (also the legacy type-less ``{"error": "..."}`` shape)."""

    code: int | None
    message: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


Event = Begin | SpeechStarted | Turn | Termination | ServerError

_unknown_lock = threading.Lock()
_unknown_seen: set[str] = set()


def parse_message(text: str | bytes) -> Event | None:
    """One server message; ``None`` for a type we do not know. ProtocolError if it is not a
    JSON object or a known type lacks a required field."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"server message is not JSON: {str(text)[:80]!r}") from exc
    if not isinstance(data, dict):
        raise ProtocolError(f"server message is not a JSON object: {str(text)[:80]!r}")
    kind = data.get("type")
    try:
        if kind is None and "error" in data:
            return _error(data)
        parser = _PARSERS.get(kind) if isinstance(kind, str) else None
        if parser is None:
            _note_unknown(str(kind))
            return None
        return parser(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed {kind} message ({exc!r}): {str(text)[:120]!r}") from exc


def _note_unknown(kind: str) -> None:
    with _unknown_lock:
        first = kind not in _unknown_seen and len(_unknown_seen) < 100
        if first:
            _unknown_seen.add(kind)
    if first:
        log.info("ignoring server messages of unknown type %r", kind[:40])
    else:
        log.debug("ignoring server message of unknown type %r", kind[:40])


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return int(value)


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true/false, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _optional_float(value: Any) -> float | None:
    return None if value is None else _float(value)


def _begin(data: dict[str, Any]) -> Begin:
    return Begin(id=_str(data["id"]), expires_at=_int(data["expires_at"]), raw=data)


def _speech_started(data: dict[str, Any]) -> SpeechStarted:
    return SpeechStarted(timestamp_ms=_int(data["timestamp"]),
                         confidence=_float(data.get("confidence", 0.0)), raw=data)


def _word(data: Mapping[str, Any]) -> Word:
    return Word(text=_str(data["text"]), start_ms=_int(data["start"]), end_ms=_int(data["end"]),
                confidence=_float(data.get("confidence", 0.0)),
                word_is_final=_bool(data.get("word_is_final", False)))


def _turn(data: dict[str, Any]) -> Turn:
    words = data.get("words") or []
    if not isinstance(words, list):
        raise TypeError("words is not a list")
    return Turn(
        turn_order=_int(data["turn_order"]),
        transcript=_str(data.get("transcript", "")),
        end_of_turn=_bool(data["end_of_turn"]),
        turn_is_formatted=_bool(data.get("turn_is_formatted", False)),
        end_of_turn_confidence=_float(data.get("end_of_turn_confidence", 0.0)),
        words=tuple(_word(w) for w in words),
        utterance=_str(data.get("utterance") or ""),
        raw=data,
    )


def _termination(data: dict[str, Any]) -> Termination:
    return Termination(
        audio_duration_seconds=_optional_float(data.get("audio_duration_seconds")),
        session_duration_seconds=_optional_float(data.get("session_duration_seconds")),
        raw=data,
    )


def _error(data: dict[str, Any]) -> ServerError:
    code = data.get("error_code")
    message = data.get("error")
    return ServerError(code=None if code is None else _int(code),
                       message=str(message) if message is not None else "", raw=data)


_PARSERS: dict[str, Callable[[dict[str, Any]], Event]] = {
    "Begin": _begin,
    "SpeechStarted": _speech_started,
    "Turn": _turn,
    "Termination": _termination,
    "Error": _error,
}
