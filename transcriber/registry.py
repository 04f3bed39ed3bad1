"""The worker's reading of the audio side of Redis: the device registry and each device stream's
consumer group.

Registry (``ns:devices``, DESIGN §3): the devices heard from recently. An entry that cannot be
used (a field that is no device id, a value that is no record) is counted once in
``transcriber_registry_problems_total{kind}``, however many rounds it stays there, and logged
once per kind.

Streams: the consumer group starts at the beginning of what is retained; a new owner claims
(XAUTOCLAIM) every entry a previous owner read but never acknowledged, and acknowledges unread
those older than the stale limit.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from capture.common.logs import OncePerKind
from capture.contract import DeviceRecord, Keys, MalformedEntry, is_valid_device_id
from transcriber.metrics import TranscriberMetrics

log = logging.getLogger(__name__)

CLAIM_COUNT = 1000  # pending entries claimed per XAUTOCLAIM
_MAX_REMEMBERED = 10_000  # distinct problems remembered as counted (then forgotten, recounted)


class Problems:
    """Bad input: each distinct case counted once, each kind logged once."""

    def __init__(self, metrics: TranscriberMetrics, once: OncePerKind) -> None:
        self._metrics = metrics
        self.once = once
        self._counted: set[str] = set()

    def report(self, kind: str, what: bytes, msg: str, *args: object) -> None:
        key = kind + ":" + hashlib.sha256(what).hexdigest()
        if key not in self._counted:
            if len(self._counted) >= _MAX_REMEMBERED:
                self._counted.clear()
            self._counted.add(key)
            self._metrics.registry_problems.labels(kind).inc()
        self.once.warning(kind, msg, *args)


class DeviceRegistry:
    def __init__(self, client: redis.Redis, keys: Keys, problems: Problems,
                 wall: Callable[[], float], gone_after_s: float) -> None:
        self._redis = client
        self._key = keys.devices
        self._problems = problems
        self._wall = wall
        self._gone_after_s = gone_after_s

    def alive(self) -> set[str]:
        """Devices whose registry heartbeat is recent."""
        registry: dict[bytes, bytes] = self._redis.hgetall(self._key)  # type: ignore[assignment]
        alive: set[str] = set()
        now = self._wall()
        for raw_device, raw_record in registry.items():
            device = self._device_name(raw_device)
            if device is None:
                continue
            try:
                record = DeviceRecord.from_json(raw_record)
            except MalformedEntry as exc:
                self._problems.report(f"registry_{exc.kind}", raw_device + b"\0" + raw_record,
                                      "device %s: ignoring its registry entry: %s", device, exc)
                continue
            if now - record.seen < self._gone_after_s:
                alive.add(device)
        return alive

    def _device_name(self, raw: bytes) -> str | None:
        try:
            device = raw.decode("ascii")
        except UnicodeDecodeError:
            device = ""
        if not is_valid_device_id(device):
            self._problems.report("bad_device_id", raw, "ignoring registry field %r: not a "
                                  "valid device id", raw[:80])
            return None
        return device


def ensure_group(client: redis.Redis, key: str, group: str) -> None:
    try:
        # From the start of what is retained: audio written before we looked is not lost;
        # what is too old is skipped as stale.
        client.xgroup_create(key, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


@dataclass(frozen=True)
class Claimed:
    entries: int  # now pending for us, to be read again
    stale: int  # acknowledged unread: older than the stale limit
    trimmed: int  # pending, but gone from the stream before anyone used them


def claim_pending(client: redis.Redis, key: str, group: str, consumer: str,
                  stale_after_s: float) -> Claimed:
    """Take over every entry of ``key`` read but never acknowledged (its reader died)."""
    seconds, micros = client.time()
    stale_before_ms = int(seconds) * 1000 + int(micros) // 1000 - int(stale_after_s * 1000)
    start = "0-0"
    claimed = stale = trimmed = 0
    while True:
        reply: Any = client.xautoclaim(key, group, consumer, min_idle_time=0, start_id=start,
                                       count=CLAIM_COUNT)
        start = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        old = [entry_id for entry_id, _ in reply[1] if entry_ms(entry_id) < stale_before_ms]
        if old:
            client.xack(key, group, *old)
        claimed += len(reply[1]) - len(old)
        stale += len(old)
        trimmed += len(reply[2]) if len(reply) > 2 else 0
        if start == "0-0":
            return Claimed(claimed, stale, trimmed)


def entry_ms(entry_id: bytes | str) -> int:
    """The Redis server time (ms) in a stream entry id."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])
