"""Clients that use AssemblyAI without edgescribe's lifecycle, for ``bench.cost_of_silence``.

``PacedClient`` streams a recording to the double at real time, one 50 ms frame per message,
each sent when it is complete, on the protocol client the product uses (``StreamingSession``):

- ``timeout_s=None``: **always open**, one session for the whole recording, then Terminate.
- ``timeout_s=5``: **the cookbook's rule** (reference/assemblyai-v3.md §6): the inactivity check
  runs only when a ``Turn`` arrives; a non-empty transcript refreshes the timer; more than
  ``timeout_s`` since the last one terminates the session. The cookbook itself then stops for
  good (one-shot), which would lose everything said later; this client does what a user of it
  has to add for a microphone that keeps streaming: the next frame opens a new session.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.audio import frames_of, whole_frames
from transcriber.aai.client import StreamingSession
from transcriber.aai.errors import StreamingError
from transcriber.aai.events import Termination, Turn
from transcriber.aai.params import StreamingParams

RECV_POLL_S = 0.25
END_WAIT_S = 10.0


@dataclass
class _Session:
    session: StreamingSession
    opened_at: float
    last_transcript: float
    finals: dict[int, str] = field(default_factory=dict)
    terminating: bool = False
    termination: Termination | None = None
    closed_at: float | None = None
    receiver: threading.Thread | None = None


class PacedClient:
    def __init__(self, name: str, url: str, *, api_key: str, params: StreamingParams,
                 samples: np.ndarray, start: float, timeout_s: float | None) -> None:
        self.name = name
        self._url = url
        self._key = api_key
        self._params = params
        self._frames = frames_of(whole_frames(samples))
        self._start = start
        self._timeout_s = timeout_s
        self._sessions: list[_Session] = []
        self._lost_frames = 0
        self._thread = threading.Thread(target=self._send_all, name=f"client-{name}")

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    # --- sending -------------------------------------------------------------------------

    def _send_all(self) -> None:
        time.sleep(max(0.0, self._start - time.time()))
        current = self._open()
        for n, frame in enumerate(self._frames):
            wait = self._start + (n + 1) * 0.05 - time.time()
            if wait > 0:
                time.sleep(wait)
            if current.terminating or current.closed_at is not None:
                current = self._open()  # the cookbook's session ended: the mic goes on
            try:
                current.session.send_audio(frame)
            except StreamingError:
                self._lost_frames += 1
        if not current.terminating:
            current.terminating = True
            with contextlib.suppress(StreamingError):
                current.session.send_terminate()
        for s in self._sessions:
            if s.receiver is not None:
                s.receiver.join(END_WAIT_S)
            s.session.close()

    def _open(self) -> _Session:
        session = StreamingSession(self._url, self._key, self._params,
                                   user_agent=f"bench-{self.name}")
        opened = time.time()
        session.open(timeout=10.0)
        s = _Session(session, opened, last_transcript=time.time())
        s.receiver = threading.Thread(target=self._receive, args=(s,), daemon=True,
                                      name=f"recv-{self.name}")
        self._sessions.append(s)
        s.receiver.start()
        return s

    # --- receiving -----------------------------------------------------------------------

    def _receive(self, s: _Session) -> None:
        while True:
            try:
                event = s.session.recv(RECV_POLL_S)
            except StreamingError:
                s.closed_at = time.time()
                return
            if isinstance(event, Termination):
                s.termination = event
            elif isinstance(event, Turn):
                self._on_turn(s, event)

    def _on_turn(self, s: _Session, turn: Turn) -> None:
        if turn.end_of_turn and turn.transcript.strip():
            s.finals[turn.turn_order] = turn.transcript  # a formatted repeat replaces it
        if self._timeout_s is None:
            return
        now = time.time()
        if turn.transcript.strip():
            s.last_transcript = now
        if now - s.last_transcript > self._timeout_s and not s.terminating:
            s.terminating = True
            with contextlib.suppress(StreamingError):
                s.session.send_terminate()

    # --- result --------------------------------------------------------------------------

    def result(self) -> dict[str, Any]:
        sessions = [{
            "opened_at": s.opened_at, "closed_at": s.closed_at,
            "session_id": s.session.session_id,
            "termination_s": (s.termination.session_duration_seconds
                              if s.termination is not None else None),
            "finals": [s.finals[k] for k in sorted(s.finals)],
        } for s in self._sessions]
        return {"sessions": sessions, "lost_frames": self._lost_frames}
