"""Wire format of the double: query validation, client message validation, server messages."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tests.double.config import SPEECH_MODELS
from tests.double.recognizer import RecognisedWord

ENCODINGS = {"pcm_s16le": 2, "pcm_mulaw": 1}
_CLOSE_REASON_MAX = 123      # bytes allowed in a close frame's reason


class ProtocolViolation(Exception):
    """The client broke the protocol: send Error{code, message} and close with ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class SessionParams:
    speech_model: str
    sample_rate: int
    encoding: str
    format_turns: bool
    keyterms: tuple[str, ...]
    min_turn_silence_ms: int | None
    max_turn_silence_ms: int | None
    end_of_turn_confidence_threshold: float | None
    inactivity_timeout_s: int | None

    @property
    def bytes_per_sample(self) -> int:
        return ENCODINGS[self.encoding]


def _invalid(name: str, why: str) -> ProtocolViolation:
    return ProtocolViolation(3006, f"User Input Validation Error: Invalid '{name}': {why}")


def _bool(name: str, raw: str) -> bool:
    # The Python SDK urlencodes Python booleans as True/False; both spellings are accepted.
    lowered = raw.lower()
    if lowered not in ("true", "false"):
        raise _invalid(name, f"Value error, expected true or false, got {raw!r}")
    return lowered == "true"


def _int(name: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise _invalid(name, f"Value error, expected an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise _invalid(name, f"Value error, must be between {low} and {high}")
    return value


def _keyterms(raw: str) -> tuple[str, ...]:
    try:
        value = json.loads(raw)
    except ValueError:
        raise _invalid("keyterms_prompt", "Value error, Invalid JSON array") from None
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise _invalid("keyterms_prompt", "Value error, Invalid JSON array")
    if len(value) > 100 or any(len(t) > 50 for t in value):
        raise _invalid("keyterms_prompt", "Value error, at most 100 terms of 50 characters")
    return tuple(value)


def parse_query(pairs: Sequence[tuple[str, str]]) -> SessionParams:
    """Session parameters from the query string, or ProtocolViolation(3006)."""
    seen: dict[str, str] = {}
    for name, value in pairs:
        if name in seen:
            raise _invalid(name, "Value error, given more than once")
        seen[name] = value
    model = seen.get("speech_model")
    if model is None:
        raise _invalid("speech_model", "Field required")
    if model not in SPEECH_MODELS:
        raise _invalid("speech_model", f"Input should be one of {sorted(SPEECH_MODELS)}")
    encoding = seen.get("encoding", "pcm_s16le")
    if encoding not in ENCODINGS:
        raise _invalid("encoding", f"Input should be one of {sorted(ENCODINGS)}")
    threshold = None
    if "end_of_turn_confidence_threshold" in seen:
        try:
            threshold = float(seen["end_of_turn_confidence_threshold"])
        except ValueError:
            raise _invalid("end_of_turn_confidence_threshold", "Value error, not a number") \
                from None
        if not 0.0 <= threshold <= 1.0:
            raise _invalid("end_of_turn_confidence_threshold", "Value error, must be 0–1")

    def optional_int(name: str, low: int, high: int) -> int | None:
        return _int(name, seen[name], low, high) if name in seen else None

    return SessionParams(
        speech_model=model,
        sample_rate=_int("sample_rate", seen.get("sample_rate", "16000"), 8000, 48000),
        encoding=encoding,
        format_turns=_bool("format_turns", seen["format_turns"]) if "format_turns" in seen
        else True,
        keyterms=_keyterms(seen["keyterms_prompt"]) if "keyterms_prompt" in seen else (),
        min_turn_silence_ms=optional_int("min_turn_silence", 0, 60000),
        max_turn_silence_ms=optional_int("max_turn_silence", 0, 60000),
        end_of_turn_confidence_threshold=threshold,
        inactivity_timeout_s=optional_int("inactivity_timeout", 5, 3600),
    )


_CONTROL_TYPES = frozenset({"Terminate", "ForceEndpoint", "UpdateConfiguration", "KeepAlive"})
_UPDATABLE = frozenset({
    "end_of_turn_confidence_threshold", "min_turn_silence", "max_turn_silence",
    "keyterms_prompt", "prompt", "vad_threshold", "format_turns", "filter_profanity",
})


def parse_control(text: str) -> dict[str, Any]:
    """A client text message, or ProtocolViolation(3006) naming what is wrong."""
    try:
        message = json.loads(text)
    except ValueError:
        raise ProtocolViolation(3006, f"Invalid JSON: {text[:60]}") from None
    if not isinstance(message, dict):
        raise ProtocolViolation(3006, f"Invalid Message: {text[:60]}")
    kind = message.get("type")
    if kind not in _CONTROL_TYPES:
        raise ProtocolViolation(3006, f"Invalid Message Type: {str(kind)[:60]}")
    if kind == "UpdateConfiguration":
        unknown = sorted(set(message) - _UPDATABLE - {"type"})
        if unknown:
            raise _invalid(unknown[0], "Extra inputs are not permitted")
        for name in ("min_turn_silence", "max_turn_silence"):
            value = message.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 0):
                raise _invalid(name, "Value error, expected a non-negative integer")
        terms = message.get("keyterms_prompt")
        if terms is not None and (not isinstance(terms, list)
                                  or not all(isinstance(t, str) for t in terms)):
            raise _invalid("keyterms_prompt", "Value error, Invalid JSON array")
    return message


def close_reason(message: str) -> str:
    """The close frame's reason: the message, or a pointer to the Error frame if too long."""
    if len(message.encode("utf-8")) <= _CLOSE_REASON_MAX:
        return message
    return "See Error message for details"


# -- server messages ------------------------------------------------------------------------

def begin(session_id: str | None = None, expires_at: int | None = None) -> dict[str, Any]:
    return {"type": "Begin", "id": session_id or str(uuid.uuid4()),
            "expires_at": expires_at if expires_at is not None else int(time.time()) + 10800}


def speech_started(timestamp_ms: int, confidence: float = 0.93) -> dict[str, Any]:
    return {"type": "SpeechStarted", "timestamp": timestamp_ms, "confidence": confidence}


def error(code: int, message: str) -> dict[str, Any]:
    return {"type": "Error", "error_code": code, "error": message}


def termination(audio_s: float, session_s: float) -> dict[str, Any]:
    return {"type": "Termination", "audio_duration_seconds": int(audio_s + 0.5),
            "session_duration_seconds": int(session_s + 0.5)}


def format_words(texts: Sequence[str], *, final: bool) -> list[str]:
    """Capitalise the first word; end a final turn with a period."""
    out = list(texts)
    if out:
        out[0] = out[0][:1].upper() + out[0][1:]
        if final:
            out[-1] += "."
    return out


def turn(turn_order: int, words: Sequence[RecognisedWord], finals: Sequence[bool], *,
         end_of_turn: bool, formatted: bool, transcript_words: int | None = None,
         eot_confidence: float, utterance: bool) -> dict[str, Any]:
    """A Turn message. ``transcript_words``: how many leading words the transcript holds
    (Universal partials show only finalized words); default all."""
    texts = [w.text for w in words]
    if formatted:
        texts = format_words(texts, final=end_of_turn)
    count = len(texts) if transcript_words is None else transcript_words
    transcript = " ".join(texts[:count])
    return {
        "type": "Turn",
        "turn_order": turn_order,
        "turn_is_formatted": formatted,
        "end_of_turn": end_of_turn,
        "transcript": transcript,
        "end_of_turn_confidence": eot_confidence,
        "words": [
            {"start": w.start_ms, "end": w.end_ms, "confidence": w.confidence, "text": text,
             "word_is_final": is_final}
            for w, text, is_final in zip(words, texts, finals, strict=True)
        ],
        "utterance": transcript if utterance else "",
    }


def dumps(message: Mapping[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))
