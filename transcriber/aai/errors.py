"""What went wrong with a streaming session, and whether trying again can help.

Close codes follow the AssemblyAI errors page (2026) plus the readings it disagrees with:
rate limiting arrives as 3009 or as 1008 "Too many concurrent sessions"; v2-era 4xxx codes may
still appear; the handshake can also be refused at the HTTP level.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    AUTH = "auth"                # bad key or account problem: retrying the same key will not help
    RATE_LIMIT = "rate_limit"    # too many new sessions: back off, then retry
    EXPIRED = "expired"          # maximum session duration reached: open a new session
    INVALID = "invalid"          # we sent something the server rejects (a bug, or pacing)
    SERVER = "server"            # server-side failure: retry with backoff
    NETWORK = "network"          # connection lost or refused, no close frame
    CLOSED = "closed"            # closed without an error (normal 1000, idle, by us)
    TIMEOUT = "timeout"          # no Begin (or no handshake) in time


_RETRYABLE = {
    ErrorKind.AUTH: False,
    ErrorKind.RATE_LIMIT: True,
    ErrorKind.EXPIRED: True,
    ErrorKind.INVALID: False,
    ErrorKind.SERVER: True,
    ErrorKind.NETWORK: True,
    ErrorKind.CLOSED: True,
    ErrorKind.TIMEOUT: True,
}


class ProtocolError(ValueError):
    """A server message that is not JSON, not an object, or lacks a required field."""


class StreamingError(Exception):
    """A session failed or ended. ``code`` is the close code (or HTTP status, or the ``Error``
    frame's ``error_code``); ``reason`` is the server's text. Never contains the API key."""

    def __init__(self, kind: ErrorKind, code: int | None = None, reason: str = "",
                 retryable: bool | None = None) -> None:
        self.kind = kind
        self.code = code
        self.reason = reason
        self.retryable = _RETRYABLE[kind] if retryable is None else retryable
        super().__init__(kind, reason, code)

    def __str__(self) -> str:
        code = f" {self.code}" if self.code is not None else ""
        again = "retryable" if self.retryable else "not retryable"
        return f"{self.kind.value}{code}: {self.reason or 'no reason given'} ({again})"

    def __repr__(self) -> str:
        return (f"StreamingError(kind={self.kind.name}, code={self.code!r}, "
                f"reason={self.reason!r}, retryable={self.retryable})")


_CLOSE_TEXT = {
    1000: "closed normally",
    1001: "server going away",
    1002: "protocol error",
    1003: "unsupported data",
    1005: "closed without a status code",
    1006: "connection lost without a close frame",
    1007: "invalid frame payload",
    1008: "policy violation",
    1009: "message too big",
    1011: "internal server error",
    1012: "service restart",
    1013: "try again later",
}


def classify_http_status(status: int, reason: str = "") -> StreamingError:
    """A handshake refused with an HTTP status instead of a WebSocket close."""
    reason = reason or f"handshake refused with HTTP {status}"
    if status in (401, 403):
        return StreamingError(ErrorKind.AUTH, status, reason)
    if status == 429:
        return StreamingError(ErrorKind.RATE_LIMIT, status, reason)
    if status >= 500:
        return StreamingError(ErrorKind.SERVER, status, reason)
    # 410 "Deprecated endpoint" (the v2 URL), 400, 404…: wrong URL or parameters.
    return StreamingError(ErrorKind.INVALID, status, reason)


_BY_CODE: dict[int, tuple[ErrorKind, bool | None]] = {
    1000: (ErrorKind.CLOSED, None),
    1005: (ErrorKind.CLOSED, None),
    1006: (ErrorKind.NETWORK, None),
    1001: (ErrorKind.SERVER, None),
    1011: (ErrorKind.SERVER, None),
    1012: (ErrorKind.SERVER, None),
    1013: (ErrorKind.SERVER, None),
    1002: (ErrorKind.INVALID, None),
    1003: (ErrorKind.INVALID, None),
    1007: (ErrorKind.INVALID, None),
    1009: (ErrorKind.INVALID, None),
    1010: (ErrorKind.INVALID, None),
    3005: (ErrorKind.SERVER, None),
    3006: (ErrorKind.INVALID, None),
    3008: (ErrorKind.EXPIRED, None),
    3009: (ErrorKind.RATE_LIMIT, None),
    # v2-era codes the SDK still lists; no v3 document mentions them.
    4001: (ErrorKind.AUTH, None),
    4002: (ErrorKind.AUTH, None),
    4029: (ErrorKind.INVALID, True),
    4031: (ErrorKind.CLOSED, None),
}


def classify_close(code: int | None, reason: str) -> StreamingError:
    """The error for a close code (``None``: no close frame) and its reason text."""
    if code is None:
        return StreamingError(ErrorKind.NETWORK, None, reason or "connection lost")
    if code < 1000:
        return classify_http_status(code, reason)
    reason = reason or _CLOSE_TEXT.get(code, f"closed with code {code}")
    lowered = reason.lower()
    retryable: bool | None = None
    if code == 1008:
        # Rate limiting was documented as 1008 "Too many concurrent sessions" before 3009.
        limited = "concurrent" in lowered or "too many" in lowered
        kind = ErrorKind.RATE_LIMIT if limited else ErrorKind.AUTH
    elif code == 3007:
        # Chunk size is a bug; sending faster than real time passes once pacing is fixed.
        kind = ErrorKind.INVALID
        retryable = "rate exceeded" in lowered or "transmission rate" in lowered
    elif code in _BY_CODE:
        kind, retryable = _BY_CODE[code]
    elif code < 2000:
        kind = ErrorKind.NETWORK
    else:
        kind = ErrorKind.SERVER
    return StreamingError(kind, code, reason, retryable)
