"""One AssemblyAI connection, driven by its own reader thread.

The thread opens the session (bounded wait for Begin), then receives events until the socket
closes, posting everything to the device's inbox tagged with a generation number, so the device
can ignore a connection it has already given up on. Sends come from the device thread; the
protocol client allows one sender and one receiver thread at a time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from transcriber.aai.client import StreamingSession
from transcriber.aai.errors import ErrorKind, StreamingError
from transcriber.aai.events import Begin, Event

log = logging.getLogger(__name__)

RECV_POLL_S = 0.25  # how often the reader notices it was asked to stop


@dataclass(frozen=True)
class Opened:
    generation: int
    begin: Begin


@dataclass(frozen=True)
class Received:
    generation: int
    event: Event


@dataclass(frozen=True)
class Closed:
    generation: int
    error: StreamingError | None


ConnectionMessage = Opened | Received | Closed


class Connection:
    def __init__(self, generation: int, session: StreamingSession,
                 post: Callable[[ConnectionMessage], None], connect_timeout_s: float,
                 thread_name: str) -> None:
        self.generation = generation
        self._session = session
        self._post = post
        self._connect_timeout_s = connect_timeout_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(name=thread_name, target=self._run, daemon=True)

    @property
    def session(self) -> StreamingSession:
        return self._session

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop receiving and close the socket; the reader posts Closed when it notices."""
        self._stopping.set()
        self._session.close()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        error: StreamingError | None = None
        try:
            begin = self._session.open(timeout=self._connect_timeout_s)
            self._post(Opened(self.generation, begin))
            while not self._stopping.is_set():
                event = self._session.recv(RECV_POLL_S)
                if event is not None:
                    self._post(Received(self.generation, event))
        except StreamingError as exc:
            error = exc
        except Exception as exc:  # a bug in parsing must end this connection, not the process
            log.exception("connection %d: unexpected error", self.generation)
            error = StreamingError(ErrorKind.NETWORK, None, f"unexpected: {type(exc).__name__}")
        finally:
            self._session.close()
            self._post(Closed(self.generation, None if self._stopping.is_set() else error))
