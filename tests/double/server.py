"""The AssemblyAI Universal Streaming v3 double: a websockets server on a background thread.

    with DoubleServer(DoubleConfig(api_keys=("k",))) as double:
        session = StreamingSession(double.url, "k", StreamingParams())
        ...
        record = double.wait_for_session(0)

Everything it sees is recorded per connection (:class:`SessionRecord` snapshots, thread-safe).
Faults can be configured up front (:class:`DoubleConfig`) or triggered mid-session with
``drop``, ``fail``, ``expire``, ``inject``, ``reject_next`` and ``set_ignore_terminate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from tests.double import protocol
from tests.double.config import DoubleConfig, behaviour_of
from tests.double.protocol import ProtocolViolation
from tests.double.recognizer import DigitRecogniser
from tests.double.records import LiveRecord, SessionRecord
from tests.double.session import DoubleSession

log = logging.getLogger(__name__)
PATH = "/v3/ws"

_recognisers: dict[tuple[str, int], DigitRecogniser] = {}
_recognisers_lock = threading.Lock()


def shared_recogniser(voice: str, words_per_minute: int) -> DigitRecogniser:
    """One recogniser per voice for the whole process (building one takes ~0.5 s)."""
    with _recognisers_lock:
        key = (voice, words_per_minute)
        if key not in _recognisers:
            _recognisers[key] = DigitRecogniser(voice, words_per_minute)
        return _recognisers[key]


class DoubleServer:
    def __init__(self, config: DoubleConfig | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, recogniser: DigitRecogniser | None = None) -> None:
        self.config = config or DoubleConfig()
        self._host = host
        self._requested_port = port
        self._recogniser = recogniser
        self._cond = threading.Condition()
        self._records: list[LiveRecord] = []
        self._sessions: dict[str, DoubleSession] = {}
        self._by_connection: dict[int, LiveRecord] = {}     # until the handler takes it
        self._reject_left = self.config.reject_first
        self._reject = (self.config.reject_code, self.config.reject_reason)
        self._ignore_terminate = self.config.ignore_terminate
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self.executor = ThreadPoolExecutor(self.config.decode_workers,
                                           thread_name_prefix="double-decode")
        self.port = 0

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> DoubleServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"ws://{self._host}:{self.port}{PATH}"

    @property
    def recogniser(self) -> DigitRecogniser:
        if self._recogniser is None:
            raise RuntimeError("the double is not started")
        return self._recogniser

    def start(self) -> DoubleServer:
        if self._recogniser is None:
            self._recogniser = shared_recogniser(self.config.voice, self.config.words_per_minute)
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(self._serve())
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="aai-double", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise RuntimeError(f"the AssemblyAI double could not start: {failure[0]}")
        return self

    async def _serve(self) -> Server:
        # No server pings: the service's keepalive behaviour is undocumented, and a client
        # that does not read for a while must not be cut off by the double.
        return await serve(self._handle, self._host, self._requested_port,
                           process_request=self._process_request, ping_interval=None,
                           compression=None, close_timeout=2)

    def stop(self, timeout: float = 5.0) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None or self._thread is None:
            return

        async def shutdown() -> None:
            server.close()
            try:
                await asyncio.wait_for(asyncio.shield(server.wait_closed()), 0.5)
            except TimeoutError:
                # Clients that do not answer the closing handshake: cut them off.
                for connection in server.connections:
                    connection.transport.abort()
                await asyncio.wait_for(server.wait_closed(), timeout)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout + 1)
        except (TimeoutError, RuntimeError):
            log.warning("the double did not close every connection in %.0f s", timeout)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._loop = self._server = None

    # -- records --------------------------------------------------------------------------

    def update(self, record: LiveRecord, change: Callable[[LiveRecord], None]) -> None:
        with self._cond:
            change(record)
            self._cond.notify_all()

    def ignore_terminate(self) -> bool:
        return self._ignore_terminate

    def records(self) -> list[SessionRecord]:
        """Every connection so far, refused ones included, in arrival order."""
        with self._cond:
            return [r.snapshot() for r in self._records]

    def sessions(self) -> list[SessionRecord]:
        """Connections that got a Begin, in order."""
        return [r for r in self.records() if r.session_id is not None]

    def record(self, session_id: str) -> SessionRecord:
        for r in self.records():
            if r.session_id == session_id:
                return r
        raise KeyError(session_id)

    def wait_for(self, predicate: Callable[[list[SessionRecord]], bool],
                 timeout: float = 5.0) -> list[SessionRecord]:
        """The records once ``predicate(records)`` holds; TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                snapshot = [r.snapshot() for r in self._records]
                if predicate(snapshot):
                    return snapshot
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"double: condition not met within {timeout} s")
                self._cond.wait(left)

    def wait_for_session(self, index: int = 0, *, closed: bool = False,
                         timeout: float = 5.0) -> SessionRecord:
        """The ``index``-th session that got a Begin (once closed, if ``closed``)."""
        def ready(records: list[SessionRecord]) -> bool:
            accepted = [r for r in records if r.session_id is not None]
            return len(accepted) > index and (not closed or accepted[index].closed_at is not None)
        records = self.wait_for(ready, timeout)
        return [r for r in records if r.session_id is not None][index]

    # -- faults at run time ---------------------------------------------------------------

    def drop(self, session_id: str | None = None) -> None:
        """Cut the TCP connection of one session (or all) without a close frame."""
        self._each(session_id, lambda s: s.drop())

    def fail(self, session_id: str | None = None, code: int = 3005,
             message: str = "Session Cancelled: An error occurred") -> None:
        """Send Error{code, message} and close with ``code``."""
        self._each(session_id, lambda s: s.fail(code, message))

    def expire(self, session_id: str | None = None) -> None:
        """Behave as if the maximum session duration were reached now."""
        self._each(session_id, lambda s: s.expire())

    def inject(self, session_id: str | None, message: str | dict[str, Any]) -> None:
        """Send an arbitrary message (a dict as JSON, a str as is)."""
        if isinstance(message, str):
            self._each(session_id, lambda s: s.send_raw(message))
        else:
            self._each(session_id, lambda s: s.send(message))

    def reject_next(self, count: int, code: int = 3009,
                    reason: str = "Unauthorized Connection: Too many concurrent sessions") -> None:
        """Refuse the next ``count`` connections: Error+close ``code`` after the upgrade, or an
        HTTP status when ``code`` < 1000."""
        with self._cond:
            self._reject_left, self._reject = count, (code, reason)

    def set_ignore_terminate(self, ignore: bool) -> None:
        self._ignore_terminate = ignore

    def _each(self, session_id: str | None,
              action: Callable[[DoubleSession], Coroutine[Any, Any, None]]) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the double is not running")

        async def run() -> None:
            targets = list(self._sessions.values()) if session_id is None \
                else [self._sessions[session_id]]
            for target in targets:
                await action(target)

        asyncio.run_coroutine_threadsafe(run(), loop).result(5)

    # -- connections ----------------------------------------------------------------------

    def _new_record(self, request: Request) -> LiveRecord:
        parts = urlsplit(request.path)
        headers: Headers = request.headers
        with self._cond:
            record = LiveRecord(
                index=len(self._records), path=parts.path,
                query=parse_qsl(parts.query, keep_blank_values=True),
                authorization=headers.get("Authorization"), user_agent=headers.get("User-Agent"),
                connected_at=time.monotonic())
            self._records.append(record)
            self._cond.notify_all()
        return record

    def _take_rejection(self, *, http: bool) -> tuple[int, str] | None:
        """The next pending refusal of this kind (HTTP status, or close code ≥ 1000)."""
        with self._cond:
            if self._reject_left <= 0 or (self._reject[0] < 1000) != http:
                return None
            self._reject_left -= 1
            return self._reject

    def _auth_problem(self, record: LiveRecord) -> str | None:
        key = record.authorization or dict(record.query).get("token")
        if not key:
            return "Unauthorized Connection: Missing Authorization header"
        if key not in self.config.api_keys:
            return "Unauthorized Connection: Invalid API key"
        return None

    def _refuse_http(self, connection: ServerConnection, record: LiveRecord, status: int,
                     text: str) -> Response:
        def change(r: LiveRecord) -> None:
            r.closed_by, r.close_code, r.close_reason = "http", status, text
            r.closed_at = time.monotonic()
        self.update(record, change)
        return connection.respond(status, text + "\n")

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        record = self._new_record(request)
        self._by_connection[id(connection)] = record
        if record.path.startswith("/v2/realtime"):
            return self._refuse_http(connection, record, 410, "Deprecated endpoint")
        if record.path != PATH:
            return self._refuse_http(connection, record, 404, "Not Found")
        if self.config.reject_auth_with_http_401:
            problem = self._auth_problem(record)
            if problem is not None:
                return self._refuse_http(connection, record, 401, problem)
        rejection = self._take_rejection(http=True)
        if rejection is not None:
            return self._refuse_http(connection, record, *rejection)
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        record = self._by_connection.pop(id(ws))
        early = _Early(ws, self, record)
        rejection = self._take_rejection(http=False)
        problem = self._auth_problem(record)
        if rejection is not None:
            await early.refuse(*rejection, error_frame=True)
            return
        if problem is not None:
            await early.refuse(1008, problem, error_frame=True)
            return
        try:
            params = protocol.parse_query(record.query)
        except ProtocolViolation as violation:
            await early.refuse(violation.code, violation.message, error_frame=True)
            return
        if self.config.close_before_begin is not None:
            await early.refuse(*self.config.close_before_begin, error_frame=False)
            return
        if self.config.begin_delay_s:
            with contextlib.suppress(TimeoutError):
                # Ends early when the client gives up waiting for Begin.
                await asyncio.wait_for(ws.wait_closed(), self.config.begin_delay_s)
            if ws.close_code is not None:
                self.update(record, lambda r: setattr(r, "closed_at", time.monotonic()))
                return
        behaviour = self.config.mode or behaviour_of(params.speech_model)
        session_id = str(uuid.uuid4())

        def accept(r: LiveRecord) -> None:
            r.accepted, r.session_id, r.behaviour = True, session_id, behaviour
        self.update(record, accept)
        session = DoubleSession(ws, self, record, params, behaviour)
        self._sessions[session_id] = session
        try:
            await session.run(session_id)
        finally:
            del self._sessions[session_id]


class _Early:
    """Refusals after the upgrade, before Begin (Error frame optional, then the close)."""

    def __init__(self, ws: ServerConnection, server: DoubleServer, record: LiveRecord) -> None:
        self.ws, self.server, self.record = ws, server, record

    async def refuse(self, code: int, message: str, *, error_frame: bool) -> None:
        from websockets.exceptions import ConnectionClosed
        try:
            if error_frame:
                error = protocol.error(code, message)
                await self.ws.send(protocol.dumps(error))
                self.server.update(self.record, lambda r: r.sent.append(error))

            def change(r: LiveRecord) -> None:
                r.closed_by, r.close_code = "server", code
                r.close_reason = protocol.close_reason(message)
                r.closed_at = time.monotonic()
            self.server.update(self.record, change)
            closing = asyncio.get_running_loop().create_task(
                self.ws.close(code, protocol.close_reason(message)))
            async for _ in self.ws:
                pass                 # drain what the client sent, up to its close reply
            await closing
        except ConnectionClosed:
            pass
