"""Supervised loops: named errors are retried with capped, jittered backoff; waits honour stop."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Backoff:
    """Exponential backoff with full jitter, capped; ``reset()`` after a success.

    The n-th delay is uniform in [cap_n / 2, cap_n] where cap_n = min(cap, initial * 2**n):
    never zero (no hot loop), and spread so that replicas do not retry in lockstep.
    """

    initial_s: float = 0.2
    cap_s: float = 10.0
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.initial_s * (2 ** min(self.attempts, 30)))
        self.attempts += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0


def supervise(
    name: str,
    step: Callable[[], None],
    stop: threading.Event,
    *,
    retry_on: tuple[type[BaseException], ...],
    backoff: Backoff | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> None:
    """Call ``step`` until ``stop`` is set.

    An error in ``retry_on`` is logged as a warning, an unexpected one with its traceback; both
    back off (waiting on ``stop``, so shutdown interrupts the wait) and the loop goes on. A step
    that returns normally resets the backoff.
    """
    backoff = backoff or Backoff()
    while not stop.is_set():
        try:
            step()
        except retry_on as exc:
            delay = backoff.next_delay()
            log.warning("%s: %s; retrying in %.1f s", name, _describe(exc), delay)
            error: BaseException = exc  # ``exc`` itself is unbound after the except clause
        except Exception as exc:
            delay = backoff.next_delay()
            log.exception("%s: unexpected error; retrying in %.1f s", name, delay)
            error = exc
        else:
            backoff.reset()
            continue
        if on_error is not None:
            on_error(error)
        stop.wait(delay)


def start_thread(name: str, target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(name=name, target=target, daemon=True)
    thread.start()
    return thread


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
