"""Writes one device's turns and session records and acknowledges its audio entries.

Nothing is lost when Redis is away: records wait here, in order, and go out with the next flush.
A final turn and the acknowledgement of the audio it confirms go out in one atomic write, so
after a crash either both happened (the audio is not transcribed again) or neither did (it is).

With a lease guard (how the worker runs it), every write is one Lua script that first checks the
device is still ours (transcriber/lease.py: the lease holds our holder value, or expired with the
fence counter still at our token, when it is taken back). A worker fenced out that way, because
another replica took the device over, has its turns and acknowledgements refused and counted
(``on_fenced``): the new owner transcribes that audio from the stream, so nothing is published
twice. Session records are still written: they are facts about what was billed, and unique.

The script is idempotent: each write carries a sequence number, remembered per holder, so a
write whose reply was lost (a timeout while Redis stalled, then executed after all) is not
applied twice when it is retried.

Redis Cluster: the script names ``lease:{dev}``, ``fence:{dev}``, ``audio:{dev}`` and
``published:{dev}`` (one slot) but also ``ns:turns`` and ``ns:sessions`` (other slots), so it
needs a single Redis (or a proxy that pins these keys); in Cluster the turns would have to move
to per-device streams.

``start()`` runs the flushes on a thread of their own, so a stalled Redis (each call can block
for the client's socket timeout) never holds up the device's session lifecycle; without it, the
caller flushes (``due``/``flush``).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from capture.common.redisconn import REDIS_ERRORS
from capture.contract import Keys
from transcriber.lease import LeaseGuard
from transcriber.records import SessionRecord, TurnRecord

log = logging.getLogger(__name__)

STREAM_MAXLEN = 100_000  # entries kept in ns:turns and ns:sessions (approximate trim)
ACK_FLUSH_INTERVAL_S = 1.0  # acks alone may wait this long; records go out at once
APPLIED_TTL_MS = 24 * 3600 * 1000  # how long the last applied sequence number is remembered
MAX_BATCH_ITEMS = 200  # queued items (turns, sessions, ack lists) per write
_WRITE_ERRORS: tuple[type[BaseException], ...] = (*REDIS_ERRORS, redis.RedisError)

# KEYS: 1 lease, 2 fence, 3 applied, 4 turns, 5 sessions, 6 audio
# ARGV: 1 holder, 2 token, 3 lease ttl ms, 4 sequence number, 5 group, 6 maxlen, 7 applied ttl,
#       then items: kind ("T" turn, "S" session, "A" acks), count n, n values (field, value...
#       for records; entry ids for acks).
# Returns {status, refused turns}: status 1 written, 0 fenced (sessions only), 2 already
# applied, 3 a stream key holds another type (nothing written).
_WRITE = """
local current = redis.call('GET', KEYS[1])
local owned = current == ARGV[1]
if not current then
  local fence = redis.call('GET', KEYS[2])
  -- Expired, and nobody acquired the device since (or Redis lost its data): take it back.
  if fence == ARGV[2] or not fence then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
    if not fence then redis.call('SET', KEYS[2], ARGV[2]) end
    owned = true
  end
end
local applied = redis.call('GET', KEYS[3])
if applied then
  local holder, seq = string.match(applied, '^(.*)#(%d+)$')
  if holder == ARGV[1] and tonumber(seq) >= tonumber(ARGV[4]) then
    return {2, 0}
  end
end
for _, key in ipairs({KEYS[4], KEYS[5]}) do
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'stream' and kind ~= 'none' then
    return {3, 0}
  end
end
local refused = 0
local i = 8
while i <= #ARGV do
  local kind, n = ARGV[i], tonumber(ARGV[i + 1])
  local first, last = i + 2, i + 1 + n
  if kind == 'S' then
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', unpack(ARGV, first, last))
  elseif not owned then
    if kind == 'T' then refused = refused + 1 end
  elseif kind == 'T' then
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', unpack(ARGV, first, last))
  else
    for j = first, last, 500 do
      -- A group that vanished (stream deleted) has nothing left to acknowledge.
      redis.pcall('XACK', KEYS[6], ARGV[5], unpack(ARGV, j, math.min(j + 499, last)))
    end
  end
  i = last + 1
end
redis.call('SET', KEYS[3], ARGV[1] .. '#' .. ARGV[4], 'PX', ARGV[7])
return {owned and 1 or 0, refused}
"""


@dataclass(eq=False)
class _Pending:
    turns: list[TurnRecord] = field(default_factory=list)
    sessions: list[SessionRecord] = field(default_factory=list)
    acks: list[bytes] = field(default_factory=list)
    sealed: bool = False  # taken into a write: nothing may be added to it any more


class Publisher:
    def __init__(self, client: redis.Redis, keys: Keys, device: str, group: str,
                 clock: Callable[[], float], *, guard: LeaseGuard | None = None,
                 on_fenced: Callable[[int], None] | None = None) -> None:
        self._redis = client
        self._keys = keys
        self._device = device
        self._group = group
        self._clock = clock
        self._guard = guard
        self._on_fenced = on_fenced
        self._script = client.register_script(_WRITE) if guard is not None else None
        self._applied_key = f"{keys.namespace}published:{{{device}}}"
        self._queue: deque[_Pending] = deque()
        self._lock = threading.Lock()  # the queue
        self._flush_lock = threading.Lock()  # one write at a time, in order
        self._last_flush = clock()
        self._retry_at = 0.0
        self._failures = 0
        self._seq = 0
        self._inflight: tuple[int, list[_Pending]] | None = None
        self._refused = 0
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def backlog(self) -> int:
        with self._lock:
            return sum(len(p.turns) + len(p.sessions) for p in self._queue)

    @property
    def refused(self) -> int:
        """Turns refused because another worker owns the device now."""
        return self._refused

    def turn(self, record: TurnRecord, confirms: Sequence[bytes] = ()) -> None:
        with self._lock:
            self._queue.append(_Pending(turns=[record], acks=list(confirms)))
        self._wake.set()

    def session(self, record: SessionRecord) -> None:
        with self._lock:
            self._queue.append(_Pending(sessions=[record]))
        self._wake.set()

    def ack(self, entry_ids: Sequence[bytes]) -> None:
        if not entry_ids:
            return
        with self._lock:
            tail = self._queue[-1] if self._queue else None
            if tail is not None and not tail.sealed and not tail.turns and not tail.sessions:
                tail.acks.extend(entry_ids)
            else:
                self._queue.append(_Pending(acks=list(entry_ids)))

    def due(self, now: float) -> bool:
        """Whether the caller should flush now; never while ``start()``'s thread flushes."""
        return self._thread is None and self._due(now)

    def _due(self, now: float) -> bool:
        with self._lock:
            if not self._queue or now < self._retry_at:
                return False
            has_records = any(p.turns or p.sessions for p in self._queue)
        return has_records or now - self._last_flush >= ACK_FLUSH_INTERVAL_S

    # --- the flusher thread ----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(name=f"publish-{self._device}", target=self._run,
                                        daemon=True)
        self._thread.start()

    def close(self, timeout: float = 0.5) -> None:
        """Stop the flusher thread (what is still queued stays unwritten: flush first)."""
        self._closed.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.clear()  # before looking: a record queued from now on wakes the wait
            try:
                if self._due(self._clock()):
                    self.flush()
            except Exception:  # a bug here must not silently end the device's publishing
                log.exception("device %s: unexpected error publishing", self._device)
                self._retry_at = self._clock() + 1.0
            self._wake.wait(self._next_wait())

    def _next_wait(self) -> float:
        now = self._clock()
        with self._lock:
            if not self._queue:
                return ACK_FLUSH_INTERVAL_S
        if now < self._retry_at:
            return min(ACK_FLUSH_INTERVAL_S, self._retry_at - now)
        return max(0.01, min(ACK_FLUSH_INTERVAL_S,
                             self._last_flush + ACK_FLUSH_INTERVAL_S - now))

    # --- writing ---------------------------------------------------------------------------

    def flush(self) -> bool:
        """Write everything waiting, in order. False (and kept) when Redis is unavailable."""
        with self._flush_lock:
            now = self._clock()
            self._last_flush = now
            while True:
                if self._inflight is None:
                    with self._lock:
                        batch = list(self._queue)[:MAX_BATCH_ITEMS]
                        for pending in batch:
                            pending.sealed = True
                    if not batch:
                        break
                    self._seq += 1
                    self._inflight = (self._seq, batch)
                # A failed write is retried exactly as it was: same items, same number, so the
                # script can tell whether the first attempt was applied after all.
                seq, batch = self._inflight
                try:
                    self._write(seq, batch)
                except _WRITE_ERRORS as exc:
                    self._failed(now, exc)
                    return False
                self._inflight = None
                with self._lock:
                    for _ in batch:
                        self._queue.popleft()
            if self._failures:
                log.info("device %s: publishing again after %d failed attempts",
                         self._device, self._failures)
            self._failures = 0
            return True

    def _failed(self, now: float, exc: BaseException) -> None:
        self._failures += 1
        self._retry_at = now + min(5.0, 0.2 * 2 ** min(self._failures, 5))
        if self._failures == 1:
            log.warning("device %s: cannot publish (%s); %d records kept for retry",
                        self._device, _describe(exc), self.backlog)

    def _write(self, seq: int, batch: list[_Pending]) -> None:
        if self._script is None:
            self._write_unfenced(batch)
            return
        guard = self._guard
        assert guard is not None
        args: list[Any] = [guard.holder, str(guard.token), guard.ttl_ms, seq, self._group,
                           STREAM_MAXLEN, APPLIED_TTL_MS]
        for pending in batch:
            for turn in pending.turns:
                _append_record(args, "T", turn.to_fields())
            for session in pending.sessions:
                _append_record(args, "S", session.to_fields())
            if pending.acks:
                args += ["A", len(pending.acks), *pending.acks]
        keys = [guard.lease_key, guard.fence_key, self._applied_key, self._keys.turns,
                self._keys.sessions, self._keys.audio(self._device)]
        status, refused = self._script(keys=keys, args=args)
        if int(status) == 3:
            raise redis.ResponseError(f"{self._keys.turns} or {self._keys.sessions} is not a "
                                      "stream (someone wrote another type there)")
        if int(refused):
            self._refused += int(refused)
            if self._refused == int(refused):
                log.warning("device %s: another worker owns the device now; its turns from "
                            "here are refused (the new owner transcribes that audio)",
                            self._device)
            if self._on_fenced is not None:
                self._on_fenced(int(refused))

    def _write_unfenced(self, batch: list[_Pending]) -> None:
        records = any(p.turns or p.sessions for p in batch)
        pipe = self._redis.pipeline(transaction=records)
        for pending in batch:
            for turn in pending.turns:
                pipe.xadd(self._keys.turns, turn.to_fields(),  # type: ignore[arg-type]
                          maxlen=STREAM_MAXLEN, approximate=True)
            for session in pending.sessions:
                pipe.xadd(self._keys.sessions, session.to_fields(),  # type: ignore[arg-type]
                          maxlen=STREAM_MAXLEN, approximate=True)
            if pending.acks:
                pipe.xack(self._keys.audio(self._device), self._group, *pending.acks)
        pipe.execute()


def _append_record(args: list[Any], kind: str, fields: dict[str, str | int]) -> None:
    args += [kind, 2 * len(fields)]
    for name, value in fields.items():
        args += [name, value]


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
