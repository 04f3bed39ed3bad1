"""Device ownership across transcriber replicas: one lease per device, with a fencing token, and
a roll of live replicas so devices spread over them.

A script takes a free lease (``SET ... PX``, holder = worker id + the next fencing token);
scripts renew and release it only for its holder, so a worker that paused past its TTL cannot
extend or free a lease another worker now holds. The fencing token (``INCRBY`` of the device's
fence counter) grows with every acquisition, so "nobody acquired the device since I did" is
simply "the counter still holds my token". Renewing and publishing
(transcriber/publisher.py) both rest on that rule: a lease that expired while nobody else took
it (a pause, a Redis stall longer than the TTL) is taken back; one that anybody else acquired
since is lost for good, and that worker's writes are refused. A Redis that lost its data (no
persistence, restarted) has no counter at all: the holder takes the lease back and restores
the counter to its token, so later acquisitions still get larger tokens. (Were the device
taken over, with a larger token, *before* that data loss, the old holder could come back this
way: run Redis with an append-only file where that matters.)

Spreading: each worker announces itself in ``ns:workers`` (hash: worker id -> Redis server time
of its last announcement, in ms) every discovery round. A worker counts the replicas heard from
within the lease TTL and takes new devices only up to its fair share, ceil(devices / replicas);
one that holds more than that lets an idle device go (worker.py). Server time, so the clocks of
the replicas' hosts do not matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from capture.contract import Keys

# KEYS: lease, fence. ARGV: worker id, ttl ms. The new token, or 0 when somebody holds it.
# One script, so the token handed out is always the fence counter's value (no race between two
# workers that both saw the lease free).
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local token = redis.call('INCRBY', KEYS[2], 1)
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
return token
"""

# KEYS: lease, fence. ARGV: holder, token, ttl ms. 1 = ours (extended or taken back), 0 = lost.
_RENEW = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
if current then
  return 0
end
local fence = redis.call('GET', KEYS[2])
if fence and fence ~= ARGV[2] then
  return 0
end
-- Expired, and nobody acquired the device since (or Redis lost its data): take it back.
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
if not fence then redis.call('SET', KEYS[2], ARGV[2]) end
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: the workers hash. ARGV: worker id, live window ms, forget-after ms.
# Records this worker, forgets long-silent ones, returns how many were heard within the window.
_ANNOUNCE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now)
local live = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local age = now - (tonumber(entries[i + 1]) or 0)
  if age <= tonumber(ARGV[2]) then
    live = live + 1
  elseif age > tonumber(ARGV[3]) then
    redis.call('HDEL', KEYS[1], entries[i])
  end
end
return live
"""

FORGET_WORKER_AFTER_S = 3600.0  # an entry silent this long is removed from ns:workers


@dataclass(frozen=True)
class Lease:
    device: str
    holder: str  # worker id + fencing token: the value stored under the lease key
    token: int


@dataclass(frozen=True)
class LeaseGuard:
    """What a writer needs to prove, inside a script, that it still owns the device."""

    lease_key: str
    fence_key: str
    holder: str
    token: int
    ttl_ms: int


class Leases:
    def __init__(self, client: redis.Redis, keys: Keys, worker_id: str, ttl_s: float) -> None:
        self._redis = client
        self._keys = keys
        self._worker_id = worker_id
        self._ttl_ms = int(ttl_s * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def lease_key(self, device: str) -> str:
        return f"{self._keys.namespace}lease:{{{device}}}"

    def fence_key(self, device: str) -> str:
        return f"{self._keys.namespace}fence:{{{device}}}"

    def acquire(self, device: str) -> Lease | None:
        """Take the device's lease if nobody holds it."""
        token = int(self._acquire(keys=[self.lease_key(device), self.fence_key(device)],
                                  args=[self._worker_id, self._ttl_ms]))
        if token == 0:
            return None
        return Lease(device, f"{self._worker_id}:{token}", token)

    def renew(self, lease: Lease) -> bool:
        """Extend the lease; take it back if it expired and nobody acquired it since."""
        return bool(self._renew(keys=self._script_keys(lease), args=self._script_args(lease)))

    def renew_all(self, leases: list[Lease]) -> list[bool]:
        """``renew`` for many leases in one round trip."""
        if not leases:
            return []
        # Plain EVALSHA: a pipeline of Script objects would first ask SCRIPT EXISTS, a command
        # the transcriber's ACL user need not have.
        pipe = self._redis.pipeline(transaction=False)
        for lease in leases:
            pipe.evalsha(self._renew.sha, 2, *self._script_keys(lease),
                         *self._script_args(lease))
        try:
            return [bool(ok) for ok in pipe.execute()]
        except redis.exceptions.NoScriptError:  # a restarted Redis: renew() loads it again
            return [self.renew(lease) for lease in leases]

    def release(self, lease: Lease) -> None:
        self._release(keys=[self.lease_key(lease.device)], args=[lease.holder])

    def guard(self, lease: Lease) -> LeaseGuard:
        return LeaseGuard(self.lease_key(lease.device), self.fence_key(lease.device),
                          lease.holder, lease.token, self._ttl_ms)

    def _script_keys(self, lease: Lease) -> list[str]:
        return [self.lease_key(lease.device), self.fence_key(lease.device)]

    def _script_args(self, lease: Lease) -> list[str | int]:
        return [lease.holder, str(lease.token), self._ttl_ms]


class Replicas:
    """The roll of live transcriber workers in ``ns:workers``."""

    def __init__(self, client: redis.Redis, keys: Keys, worker_id: str, live_s: float) -> None:
        self._redis = client
        self.key = f"{keys.namespace}workers"
        self._worker_id = worker_id
        self._live_ms = int(live_s * 1000)
        self._announce = client.register_script(_ANNOUNCE)

    def announce(self) -> int:
        """Record this worker as alive; returns the number of live workers (itself included)."""
        live = self._announce(keys=[self.key], args=[self._worker_id, self._live_ms,
                                                     int(FORGET_WORKER_AFTER_S * 1000)])
        return max(1, int(live))

    def leave(self) -> None:
        """Off the roll at shutdown, so the others take a fair share at once."""
        self._redis.hdel(self.key, self._worker_id)


def fair_share(devices: int, workers: int) -> int:
    """Devices one of ``workers`` replicas should hold: ceil(devices / workers)."""
    return -(-devices // max(1, workers))
