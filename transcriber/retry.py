"""How long a device waits before the next session after a failure, by kind of failure."""

from __future__ import annotations

import logging

from capture.common.supervise import Backoff
from transcriber.aai.errors import ErrorKind, StreamingError
from transcriber.config import LifecycleSettings

log = logging.getLogger(__name__)


class RetryPolicy:
    """Reconnect quickly after network trouble, slowly (minutes) after a refused key.

    Also adapts the catch-up burst: a "rate exceeded" close halves it, since how far ahead of
    real time the service tolerates is not documented.
    """

    def __init__(self, settings: LifecycleSettings, device: str) -> None:
        self._device = device
        self._reconnect = Backoff(settings.reconnect_initial_s, settings.reconnect_cap_s)
        self._refused = Backoff(settings.auth_backoff_initial_s, settings.auth_backoff_cap_s)
        self.burst_ms = settings.catchup_burst_ms

    def succeeded(self) -> None:
        """A session did its work (a final turn, a clean end): start backoff afresh."""
        self._reconnect.reset()
        self._refused.reset()

    def delay_after(self, error: StreamingError) -> float:
        if error.kind is ErrorKind.EXPIRED:
            return 0.0  # the 3 h limit: a new session right away
        if error.kind is ErrorKind.AUTH or not error.retryable:
            delay = self._refused.next_delay()
            log.error("device %s: AssemblyAI refused the session (%s); next attempt in %.0f s",
                      self._device, error, delay)
            return delay
        if error.kind is ErrorKind.INVALID:  # sent faster than real time
            self.burst_ms //= 2
        delay = self._reconnect.next_delay()
        log.warning("device %s: session failed (%s); reconnecting in %.1f s", self._device,
                    error, delay)
        return delay
