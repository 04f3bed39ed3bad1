"""The final-turn rule: exactly one final per ``turn_order``, the formatted one when asked for.

A turn ends with one ``end_of_turn`` message (U3-Pro; Universal-Streaming since 2026-03) or two
(Universal-Streaming before 2026-03 with ``format_turns=true``: unformatted, then formatted, same
``turn_order``). With formatting on, an unformatted end of turn is held until its formatted twin
arrives; if the next turn starts or the session ends first, the held one is published instead,
so nothing is lost. One filter per session (turn orders restart at 0).
"""

from __future__ import annotations

from collections import deque

from transcriber.aai.events import Turn


class FinalTurnFilter:
    def __init__(self, format_turns: bool) -> None:
        self._format_turns = format_turns
        self._held: Turn | None = None
        self._published: set[int] = set()
        self._ready: deque[Turn] = deque()

    @property
    def holding(self) -> Turn | None:
        """The unformatted final waiting for its formatted twin, if any."""
        return self._held

    def feed(self, turn: Turn) -> Turn | None:
        """The turn to publish as final now, or None.

        One message can complete two turns (a held unformatted final, then the next turn's
        formatted final with no partial between them); the second is then returned by the next
        ``feed`` or ``flush``. Use :meth:`feed_all` to get both at once.
        """
        self._ready.extend(self._accept(turn))
        return self._ready.popleft() if self._ready else None

    def feed_all(self, turn: Turn) -> list[Turn]:
        """Every turn to publish as final now (0, 1, rarely 2), oldest first."""
        self._ready.extend(self._accept(turn))
        out = list(self._ready)
        self._ready.clear()
        return out

    def flush(self) -> Turn | None:
        """At session end: the final not yet returned (a held unformatted one), or None.

        At most one can be pending: a message completes two turns only when a held turn is
        released, so nothing is held after it, and the next ``feed`` returns the queued one.
        """
        if self._ready:
            return self._ready.popleft()
        if self._held is not None:
            return self._publish(self._held)
        return None

    def _accept(self, turn: Turn) -> list[Turn]:
        out: list[Turn] = []
        held = self._held
        if held is not None and turn.turn_order != held.turn_order:
            out.append(self._publish(held))
        if not turn.end_of_turn or turn.turn_order in self._published:
            return out
        if not self._format_turns or turn.turn_is_formatted:
            out.append(self._publish(turn))
        else:
            self._held = turn
        return out

    def _publish(self, turn: Turn) -> Turn:
        self._published.add(turn.turn_order)
        if self._held is not None and self._held.turn_order == turn.turn_order:
            self._held = None
        return turn
