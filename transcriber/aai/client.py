"""One AssemblyAI Universal Streaming v3 session over ``websocket-client``, synchronous.

The class starts no threads. Threading contract:

- ``recv``, ``open`` and ``terminate`` read the socket: call them from one thread at a time
  (the session's reader).
- ``send_audio``, ``force_endpoint``, ``update_configuration``, ``keep_alive`` and
  ``send_terminate`` may be called from another thread while the reader waits in ``recv``:
  websocket-client serialises sends with its own lock, separate from reads.
- ``close`` may be called from any thread; a reader blocked in ``recv`` then raises
  ``StreamingError(kind=CLOSED)``.

Waiting never hangs: ``recv`` waits at most its ``timeout`` for a frame to start (a frame that
starts arriving is read to its end, bounded by the socket timeout ``io_timeout``); ``open`` and
``terminate`` are bounded by their timeouts.

End of a session as ``recv`` reports it: an ``Error`` frame is not returned as an event; it
becomes the ``StreamingError`` raised when the close that follows it arrives (code and message
from the ``Error`` frame). A ``Termination`` is returned as an event; the clean close that
follows it raises ``StreamingError(kind=CLOSED, code=1000)`` on the next call. After any close,
``closed`` is true and every further call raises the same error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import websocket

from transcriber.aai.errors import (
    ErrorKind,
    ProtocolError,
    StreamingError,
    classify_close,
    classify_http_status,
)
from transcriber.aai.events import Begin, Event, ServerError, Termination, parse_message
from transcriber.aai.params import StreamingParams, build_url, validate_keyterms

log = logging.getLogger(__name__)

_ERROR_CLOSE_GRACE_S = 1.0    # how long to wait for the close that follows an Error frame
_CLOSE_AFTER_TERMINATION_S = 1.0
_CONFIG_FIELDS = frozenset({
    "end_of_turn_confidence_threshold", "min_turn_silence", "max_turn_silence",
    "keyterms_prompt", "prompt", "vad_threshold", "format_turns", "filter_profanity",
})
_CONFIG_ALIASES = {"min_turn_silence_ms": "min_turn_silence",
                   "max_turn_silence_ms": "max_turn_silence"}

Connect = Callable[..., websocket.WebSocket]


class StreamingSession:
    def __init__(self, url: str, api_key: str, params: StreamingParams, *,
                 connect: Connect = websocket.create_connection,
                 clock: Callable[[], float] = time.monotonic,
                 user_agent: str = "edgescribe/0.1",
                 io_timeout: float = 10.0) -> None:
        if not api_key or any(c in api_key for c in "\r\n"):
            raise ValueError("the AssemblyAI API key is empty or contains a line break")
        self._url = build_url(url, params)
        self._api_key = api_key
        self._params = params
        self._connect = connect
        self._clock = clock
        self._user_agent = user_agent
        self._io_timeout = io_timeout
        self._ws: websocket.WebSocket | None = None
        self._lock = threading.Lock()
        self._opened = False
        self._closed_locally = False
        self._terminate_sent = False
        self._error: StreamingError | None = None
        self._termination: Termination | None = None
        self._error_frame: ServerError | None = None
        self.session_id: str | None = None
        self.expires_at: int | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("open" if self._ws is not None else "new")
        return f"StreamingSession(url={self._url!r}, session_id={self.session_id!r}, state={state})"

    @property
    def params(self) -> StreamingParams:
        return self._params

    @property
    def url(self) -> str:
        return self._url

    @property
    def closed(self) -> bool:
        """True once the socket closed for any reason (server, network, ``close()``)."""
        return self._error is not None

    @property
    def error(self) -> StreamingError | None:
        """Why the session ended (``kind=CLOSED, code=1000`` after a normal Termination)."""
        return self._error

    @property
    def termination(self) -> Termination | None:
        return self._termination

    # -- opening -------------------------------------------------------------------------

    def open(self, timeout: float = 10.0) -> Begin:
        """Connect and wait for ``Begin``. Raises StreamingError (``TIMEOUT`` past ``timeout``)."""
        with self._lock:
            if self._opened:
                raise RuntimeError("a StreamingSession can be opened only once")
            self._opened = True
        deadline = self._clock() + timeout
        real_deadline = time.monotonic() + timeout
        try:
            ws = self._connect(
                self._url,
                header=[f"Authorization: {self._api_key}", f"User-Agent: {self._user_agent}"],
                timeout=max(timeout, 0.001),
            )
        except websocket.WebSocketBadStatusException as exc:
            raise self._remember(self._handshake_refused(exc)) from None
        except (websocket.WebSocketTimeoutException, TimeoutError) as exc:
            raise self._remember(StreamingError(
                ErrorKind.TIMEOUT, None, f"no WebSocket handshake within {timeout:g} s")) from exc
        except (websocket.WebSocketException, OSError) as exc:
            raise self._remember(StreamingError(
                ErrorKind.NETWORK, None, self._scrub(f"cannot connect: {exc}"))) from exc
        with self._lock:
            self._ws = ws
        ws.settimeout(self._io_timeout)
        try:
            while self._clock() < deadline and time.monotonic() < real_deadline:
                wait = min(deadline - self._clock(), real_deadline - time.monotonic())
                event = self._next_event(max(wait, 0.0))
                if isinstance(event, Begin):
                    self.session_id, self.expires_at = event.id, event.expires_at
                    log.debug("session %s began, expires at %d", event.id, event.expires_at)
                    return event
                if event is not None:
                    log.debug("ignoring %s before Begin", type(event).__name__)
        except StreamingError:
            self._shutdown()
            raise
        self._shutdown()
        raise self._remember(
            StreamingError(ErrorKind.TIMEOUT, None, f"no Begin within {timeout:g} s"))

    def _handshake_refused(self, exc: websocket.WebSocketBadStatusException) -> StreamingError:
        status = int(exc.status_code)
        text = f"handshake refused: HTTP {status} {exc.status_message or ''}".rstrip()
        body = exc.resp_body
        if body:
            decoded = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
            text += f": {decoded.strip()[:200]}"
        return classify_http_status(status, self._scrub(text))

    # -- sending -------------------------------------------------------------------------

    def send_audio(self, pcm: bytes) -> None:
        """One audio message: 50–1000 ms of whole samples (else ValueError)."""
        width = self._params.bytes_per_sample
        if len(pcm) % width:
            raise ValueError(f"{len(pcm)} bytes is not a whole number of {width}-byte samples")
        samples = len(pcm) // width
        rate = self._params.sample_rate
        if not 50 * rate <= samples * 1000 <= 1000 * rate:
            raise ValueError(f"audio message of {samples * 1000 / rate:g} ms; "
                             "each must hold 50–1000 ms")
        self._send(bytes(pcm), websocket.ABNF.OPCODE_BINARY)

    def force_endpoint(self) -> None:
        self._send_json({"type": "ForceEndpoint"})

    def keep_alive(self) -> None:
        self._send_json({"type": "KeepAlive"})

    def send_terminate(self) -> None:
        self._send_json({"type": "Terminate"})
        self._terminate_sent = True

    def update_configuration(self, **fields: object) -> None:
        """``UpdateConfiguration`` with the given fields (``min_turn_silence_ms`` and
        ``max_turn_silence_ms`` are accepted for ``min_turn_silence``/``max_turn_silence``)."""
        if not fields:
            raise ValueError("update_configuration needs at least one field")
        message: dict[str, Any] = {"type": "UpdateConfiguration"}
        for name, value in fields.items():
            wire = _CONFIG_ALIASES.get(name, name)
            if wire not in _CONFIG_FIELDS:
                raise ValueError(f"{name!r} cannot be changed mid-session; "
                                 f"known: {', '.join(sorted(_CONFIG_FIELDS))}")
            message[wire] = list(validate_keyterms(value)) if wire == "keyterms_prompt" else value
        self._send_json(message)

    def _send_json(self, message: dict[str, Any]) -> None:
        self._send(json.dumps(message), websocket.ABNF.OPCODE_TEXT)

    def _send(self, payload: bytes | str, opcode: int) -> None:
        if self._error is not None:
            raise self._error
        ws = self._ws
        if ws is None:
            raise StreamingError(ErrorKind.CLOSED, None, "session is not open", retryable=False)
        try:
            ws.send(payload, opcode)
        except (websocket.WebSocketException, OSError, ValueError) as exc:
            if isinstance(exc, websocket.WebSocketTimeoutException):
                # A partly written frame corrupts the stream: drop the connection.
                self._abort(ws)
            # The reader learns the real close code; report that one if it is known already.
            raise (self._error or StreamingError(
                ErrorKind.NETWORK, None, self._scrub(f"send failed: {exc}"))) from exc

    # -- receiving -----------------------------------------------------------------------

    def recv(self, timeout: float) -> Event | None:
        """The next event, or None when none arrived within ``timeout`` seconds.

        Never returns ``ServerError``: the Error frame and the close after it are raised as one
        StreamingError. Raises StreamingError once the session has closed.
        """
        if self._error is not None:
            raise self._error
        if self._ws is None:
            raise StreamingError(ErrorKind.CLOSED, None, "session is not open", retryable=False)
        return self._next_event(timeout)

    def _next_event(self, timeout: float) -> Event | None:
        deadline = self._clock() + timeout
        while True:
            remaining = max(deadline - self._clock(), 0.0)
            frame = self._read_frame(remaining)
            if frame is None:
                return None        # nothing within the wait: the caller polls again
            opcode, data = frame
            if opcode != websocket.ABNF.OPCODE_TEXT:
                continue           # ping/pong (answered by websocket-client) or binary
            try:
                event = parse_message(data)
            except ProtocolError as exc:
                log.warning("ignoring a malformed server message: %s", exc)
                continue
            if isinstance(event, ServerError):
                raise self._after_error_frame(event)
            if isinstance(event, Termination):
                self._termination = event
            if event is not None:
                return event
            if self._clock() >= deadline:
                return None

    def _read_frame(self, wait: float) -> tuple[int, Any] | None:
        """One frame, or None when none starts within ``wait``. Raises on close."""
        ws = self._ws
        if ws is None or self._error is not None:
            raise self._error or StreamingError(ErrorKind.CLOSED, None, "session is not open")
        try:
            if not _readable(ws, wait):
                return None
            opcode, frame = ws.recv_data_frame(control_frame=True)
        except websocket.WebSocketTimeoutException:
            return None            # a frame started but did not complete; its bytes are kept
        except (websocket.WebSocketException, OSError, ValueError, AttributeError) as exc:
            raise self._closed_by(None, self._scrub(f"connection lost: {exc}")) from None
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code, reason = _close_status(frame.data)
            raise self._closed_by(code, reason)
        return opcode, frame.data

    def _after_error_frame(self, error: ServerError) -> StreamingError:
        """The Error frame precedes a close with the same code: wait briefly for that close,
        then report the Error's code and message."""
        self._error_frame = error
        deadline = self._clock() + _ERROR_CLOSE_GRACE_S
        real_deadline = time.monotonic() + _ERROR_CLOSE_GRACE_S
        try:
            while self._clock() < deadline and time.monotonic() < real_deadline:
                self._read_frame(max(deadline - self._clock(), 0.0))
        except StreamingError as closed:
            return closed
        return self._closed_by(None, "no close after the Error frame")

    def _closed_by(self, code: int | None, reason: str) -> StreamingError:
        error_frame = self._error_frame
        if error_frame is not None:
            error_code = error_frame.code if error_frame.code is not None else code
            error = classify_close(error_code if error_code is not None else 3005,
                                   error_frame.message or reason)
        elif self._closed_locally:
            error = StreamingError(ErrorKind.CLOSED, code, "session closed by the client",
                                   retryable=False)
        elif self._termination is not None and code in (1000, 1005):
            error = StreamingError(ErrorKind.CLOSED, code, reason or "session terminated",
                                   retryable=not self._terminate_sent)
        else:
            error = classify_close(code, reason)
        self._shutdown()
        return self._remember(error)

    # -- ending --------------------------------------------------------------------------

    def terminate(self, timeout: float = 5.0,
                  on_event: Callable[[Event], None] | None = None) -> Termination | None:
        """Send ``Terminate``, pass every event that arrives before ``Termination`` (late
        Turns) to ``on_event``, and return the Termination, or None if it did not come within
        ``timeout`` (on the injected clock, and never more than ``timeout`` of real time) or
        the session closed first. The session is closed afterwards."""
        start_real = time.monotonic()
        deadline = self._clock() + timeout
        termination = self._termination
        try:
            if termination is None and self._error is None and self._ws is not None:
                self.send_terminate()
                termination = self._await_termination(deadline, start_real + timeout, on_event)
        except StreamingError as exc:
            log.debug("session %s ended before Termination: %s", self.session_id, exc)
        finally:
            self.close()
        return termination

    def _await_termination(self, deadline: float, real_deadline: float,
                           on_event: Callable[[Event], None] | None) -> Termination | None:
        while self._clock() < deadline and time.monotonic() < real_deadline:
            wait = min(deadline - self._clock(), real_deadline - time.monotonic())
            event = self._next_event(max(wait, 0.0))
            if isinstance(event, Termination):
                # Let the server's close arrive so the close handshake completes cleanly.
                with contextlib.suppress(StreamingError):
                    self._next_event(min(_CLOSE_AFTER_TERMINATION_S,
                                         max(deadline - self._clock(), 0.0)))
                return event
            if event is not None and on_event is not None:
                on_event(event)
        return None

    def close(self) -> None:
        """Close the socket now (a close frame 1000, no wait for the reply). Idempotent."""
        with self._lock:
            if self._closed_locally:
                return
            self._closed_locally = True
            ws = self._ws
        if ws is not None and ws.connected:
            with contextlib.suppress(websocket.WebSocketException, OSError, ValueError):
                ws.settimeout(1.0)
                ws.send_close(websocket.STATUS_NORMAL)
        self._shutdown()
        self._remember(StreamingError(ErrorKind.CLOSED, None, "session closed by the client",
                                      retryable=False))

    def _shutdown(self) -> None:
        ws = self._ws
        if ws is None:
            return
        self._abort(ws)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            ws.shutdown()

    @staticmethod
    def _abort(ws: websocket.WebSocket) -> None:
        sock = ws.sock
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                sock.shutdown(socket.SHUT_RDWR)   # wakes a reader blocked on the socket

    def _remember(self, error: StreamingError) -> StreamingError:
        with self._lock:
            if self._error is None:
                self._error = error
            return self._error

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text


def _readable(ws: websocket.WebSocket, wait: float) -> bool:
    sock = ws.sock
    if sock is None:
        raise websocket.WebSocketConnectionClosedException("socket is already closed")
    pending = getattr(sock, "pending", None)   # TLS: bytes decrypted but not yet read
    if pending is not None and pending() > 0:
        return True
    ready, _, _ = select.select([sock], [], [], wait)
    return bool(ready)


def _close_status(data: bytes) -> tuple[int | None, str]:
    if len(data) < 2:
        return 1005, ""
    code = int.from_bytes(data[:2], "big")
    return code, data[2:].decode("utf-8", "replace")
