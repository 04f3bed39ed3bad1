"""New-session budget shared by every worker on one Redis: AssemblyAI limits session *starts*
per minute, account-wide (protocol reference §4.5: Free 5, paid 100+; excess closes 3009/1008).

A sliding-window log in one sorted set, kept by one Lua script, so check-and-record is atomic
across processes. Times come from the Redis server's clock (``TIME``), so workers whose clocks
disagree still share one window. (Redis ≥ 5 replicates script effects, so a write after ``TIME``
is allowed; this project runs 7.0.)

Errors: ``redis.RedisError`` (``ConnectionError``, ``TimeoutError``, ...) propagate. The caller
decides what an unreachable budget means. Failing *closed* (no new sessions) risks losing speech;
failing *open* risks the server refusing sessions (3009) while Redis is down, which the session
code must handle anyway. Either way it should be short-lived and counted.
"""

from __future__ import annotations

import secrets

import redis

# KEYS[1] = the log (sorted set: score = server time in µs, member unique per acquisition)
# ARGV = op ("acquire" | "peek"), limit, window µs, ttl ms, member suffix
# Returns {1, 0} when acquired, else {0, µs until the oldest entry leaves the window}.
_SCRIPT = """
local key = KEYS[1]
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if redis.call('ZCARD', key) < limit then
  if ARGV[1] == 'acquire' then
    redis.call('ZADD', key, now, string.format('%d', now) .. ':' .. ARGV[5])
    redis.call('PEXPIRE', key, tonumber(ARGV[4]))
    return {1, 0}
  end
  return {0, 0}
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
local wait = tonumber(oldest[2]) + window - now
if wait < 1 then wait = 1 end
return {0, wait}
"""


class SessionBudget:
    """At most ``per_minute`` acquisitions in any ``window_s`` (60 s) across all holders of ``key``.

    Thread-safe (redis-py clients are); one instance per worker is enough.
    """

    def __init__(
        self, redis: redis.Redis, key: str, per_minute: int, *, window_s: float = 60.0,
    ) -> None:
        if isinstance(per_minute, bool) or not isinstance(per_minute, int) or per_minute < 1:
            msg = f"session budget per_minute must be an integer >= 1, got {per_minute!r}"
            raise ValueError(msg)
        if not window_s > 0:
            msg = f"session budget window_s must be > 0, got {window_s!r}"
            raise ValueError(msg)
        self.key = key
        self.per_minute = per_minute
        self.window_s = window_s
        self._window_us = max(1, round(window_s * 1_000_000))
        # Every entry is older than the last one added, so one window after the last acquisition
        # the log is empty; 1/60 of margin (1 s for the real window) for rounding.
        window_ms = -(-self._window_us // 1000)
        self._ttl_ms = window_ms + max(1, window_ms // 60)
        self._script = redis.register_script(_SCRIPT)

    def try_acquire(self, device: str) -> bool:
        """True (and recorded) if fewer than ``per_minute`` sessions started in the window."""
        acquired, _wait_us = self._run("acquire", device)
        return acquired == 1

    def retry_after(self) -> float:
        """Seconds until the oldest acquisition leaves the window; 0.0 if one is available now."""
        _acquired, wait_us = self._run("peek", "")
        return wait_us / 1_000_000

    def _run(self, op: str, device: str) -> tuple[int, int]:
        # The random part keeps two acquisitions in the same µs by the same device distinct.
        member = f"{device}:{secrets.token_hex(4)}"
        reply = self._script(
            keys=[self.key], args=[op, self.per_minute, self._window_us, self._ttl_ms, member],
        )
        acquired, wait_us = reply
        return int(acquired), int(wait_us)
