"""The transcriber process: discovers devices, leases them, reads their streams, runs each one.

Threads: ``discovery`` (registry, replicas, leases, devices that are gone), ``reader`` (one
XREADGROUP over every owned stream), per device one for its lifecycle and one for publishing
(transcriber/publisher.py), and one per open connection.

Spreading over replicas (transcriber/lease.py): each discovery round a worker announces itself,
counts the live replicas and takes new devices only up to its fair share, ceil(devices /
replicas), and never more than TRANSCRIBER_MAX_DEVICES; holding more than its share (it started
first), it hands one idle device per round back. A device nobody took for two rounds (the
others are at their TRANSCRIBER_MAX_DEVICES) is taken regardless. Give every replica the same
TRANSCRIBER_MAX_DEVICES.

Taking a device over: its audio entries that a previous owner read but never acknowledged are
claimed (XAUTOCLAIM) and read again, so it resumes from the last final turn; those older than
TRANSCRIBER_STALE_AFTER_S are acknowledged unread and counted as skipped (``stale``), those the
stream trimmed away meanwhile are counted as ``trimmed``.

Shutdown order: stop discovery and reading; ask every device to terminate its session and
publish its last turns; wait for them, time-boxed; release the leases; leave the roll.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from capture.common.logs import OncePerKind
from capture.common.redisconn import REDIS_ERRORS
from capture.common.supervise import Backoff, start_thread, supervise
from capture.contract import AudioFrame, EndOfStream, Keys, MalformedEntry, decode_entry
from transcriber.aai.client import StreamingSession
from transcriber.budget import SessionBudget
from transcriber.config import TranscriberSettings
from transcriber.device import DeviceWorker
from transcriber.device_io import DeviceIO
from transcriber.device_state import Frames, Stop
from transcriber.lease import Lease, Leases, Replicas, fair_share
from transcriber.metrics import TranscriberMetrics
from transcriber.publisher import Publisher
from transcriber.records import EndReason
from transcriber.registry import DeviceRegistry, Problems, claim_pending, ensure_group
from transcriber.vad import VadSettings, VoiceActivity

log = logging.getLogger(__name__)

DISCOVERY_INTERVAL_S = 1.0  # a new device is picked up within this (+ one read)
READ_BLOCK_MS = 200
READ_COUNT = 200  # entries per stream per read: 10 s of audio
HEALTHY_WITHIN_S = 15.0
QUARANTINE_S = 60.0  # a device whose stream cannot be used is left alone this long
ORPHAN_ROUNDS = 2  # a free device nobody took for this many rounds is taken beyond the share
ORPHAN_QUIET_S = 30.0  # after taking an orphan, no device is handed back for this long


@dataclass
class _Owned:
    worker: DeviceWorker
    lease: Lease
    publisher: Publisher
    read_from: str  # "0" while our own pending entries are replayed, then ">"
    last_frame_at: float
    stopping: bool = False
    last_id: str = "0"  # the newest entry handed to the device


class Worker:
    def __init__(
        self,
        settings: TranscriberSettings,
        *,
        client: redis.Redis,
        metrics: TranscriberMetrics,
        open_session: Callable[[], StreamingSession],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._redis = client
        self._metrics = metrics
        self._open_session = open_session
        self._clock = clock
        self._wall = wall
        self._keys = Keys(settings.namespace)
        self._leases = Leases(client, self._keys, settings.worker_id, settings.lease_ttl_s)
        self._budget = SessionBudget(client, f"{settings.namespace}session_budget",
                                     settings.sessions_per_minute)
        self._replicas = Replicas(client, self._keys, settings.worker_id, settings.lease_ttl_s)
        self._devices: dict[str, _Owned] = {}
        self._lock = threading.Lock()
        self._problems = OncePerKind(log)
        self._bad_input = Problems(metrics, self._problems)
        self._registry = DeviceRegistry(client, self._keys, self._bad_input, wall,
                                        settings.lifecycle.device_gone_after_s)
        self._quarantine: dict[str, float] = {}  # device -> until (clock)
        self._free_rounds: dict[str, int] = {}  # device -> rounds seen without any lease
        self._no_shedding_until = 0.0
        self._stop_io = threading.Event()
        self._last_redis_ok = clock()
        self._threads: list[threading.Thread] = []

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        def loop(name: str, step: Callable[[], None]) -> Callable[[], None]:
            return lambda: supervise(name, step, self._stop_io, retry_on=REDIS_ERRORS,
                                     backoff=Backoff(0.2, 5.0))

        self._threads = [start_thread("discovery", loop("discovery", self._discover)),
                         start_thread("reader", loop("reader", self._read))]
        log.info("transcriber %s started: redis %s, namespace %r", self._settings.worker_id,
                 self._settings.redis_url_redacted, self._settings.namespace)

    def stop(self) -> None:
        """Terminate every session properly, within the shutdown timeout."""
        deadline = self._clock() + self._settings.shutdown_timeout_s
        self._stop_io.set()
        for thread in self._threads:
            thread.join(max(0.0, deadline - self._clock()))
        owned = self._snapshot()
        for entry in owned.values():
            entry.worker.post(Stop(EndReason.SHUTDOWN))
        for device, entry in owned.items():
            if not entry.worker.join(max(0.0, deadline - self._clock())):
                log.error("device %s did not finish before the shutdown deadline", device)
            self._let_go(device, entry)
        with contextlib.suppress(*REDIS_ERRORS, redis.ResponseError):
            self._replicas.leave()
        log.info("transcriber %s stopped (%d devices released)", self._settings.worker_id,
                 len(owned))

    def health(self) -> tuple[bool, dict[str, object]]:
        age = self._clock() - self._last_redis_ok
        with self._lock:
            devices = len(self._devices)
        return age < HEALTHY_WITHIN_S, {"devices": devices, "redis_ok_age_s": round(age, 1)}

    def devices(self) -> list[str]:
        return sorted(self._snapshot())

    # --- discovery -------------------------------------------------------------------------

    def _discover(self) -> None:
        alive = self._registry.alive()
        self._last_redis_ok = self._clock()
        self._keep_leases()
        share = min(self._settings.max_devices, fair_share(len(alive), self._live_workers()))
        now = self._clock()
        candidates = sorted(d for d in alive - set(self._snapshot())
                            if self._quarantine.get(d, 0.0) <= now)
        for device in candidates:
            held = len(self._snapshot())
            if held >= self._settings.max_devices:
                self._problems.warning("max_devices", "at TRANSCRIBER_MAX_DEVICES=%d; leaving "
                                       "more devices to other workers", self._settings.max_devices)
                break
            if held < share:
                self._try_adopt(device, orphan=False)
        self._adopt_orphans([d for d in candidates if d not in self._snapshot()])
        self._shed_excess(share, alive)
        gone_after = self._settings.lifecycle.device_gone_after_s
        for device, entry in self._snapshot().items():
            if entry.worker.finished:
                self._let_go(device, entry)
            elif (not entry.stopping and device not in alive
                  and now - entry.last_frame_at > gone_after):
                log.info("device %s: gone (no heartbeat or frames for %.0f s)", device, gone_after)
                entry.stopping = True
                entry.worker.post(Stop(EndReason.END_OF_STREAM))
        self._stop_io.wait(DISCOVERY_INTERVAL_S)  # one round per interval, not a busy loop

    def _live_workers(self) -> int:
        try:
            return self._replicas.announce()
        except redis.ResponseError as exc:  # e.g. an ACL without ns:workers: work alone
            self._problems.warning("replicas", "cannot announce this worker in %s (%s); "
                                   "taking devices without regard to other replicas",
                                   self._replicas.key, exc)
            return 1

    def _adopt_orphans(self, candidates: list[str]) -> None:
        """Take a device nobody has taken for a few rounds, beyond the fair share (the other
        replicas are full): better unbalanced than not transcribed."""
        if not candidates or len(self._snapshot()) >= self._settings.max_devices:
            self._free_rounds = {}
            return
        pipe = self._redis.pipeline(transaction=False)
        for device in candidates:
            pipe.exists(self._leases.lease_key(device))
        leased = pipe.execute()
        rounds = {d: self._free_rounds.get(d, 0) + 1 for d, taken in zip(candidates, leased,
                                                                        strict=True) if not taken}
        self._free_rounds = rounds
        for device, seen_free in rounds.items():
            if seen_free > ORPHAN_ROUNDS:
                self._try_adopt(device, orphan=True)
                return

    def _try_adopt(self, device: str, *, orphan: bool) -> None:
        lease = self._leases.acquire(device)
        if lease is None:
            return
        try:
            self._adopt(device, lease)
        except redis.ResponseError as exc:  # its stream key holds another type, ...
            with contextlib.suppress(*REDIS_ERRORS, redis.ResponseError):
                self._leases.release(lease)
            self._set_aside(device, "stream_unusable", str(exc))
            return
        except BaseException:
            with contextlib.suppress(*REDIS_ERRORS):
                self._leases.release(lease)
            raise
        if orphan:
            log.info("device %s: nobody else took it; taken beyond the fair share", device)
            self._no_shedding_until = self._clock() + ORPHAN_QUIET_S

    def _shed_excess(self, share: int, alive: set[str]) -> None:
        """Holding more than the fair share: hand one idle device back per round (devices
        that are gone from the registry are not handed anywhere: they end below)."""
        if self._clock() < self._no_shedding_until:
            return
        holding = {d: e for d, e in self._snapshot().items() if not e.stopping and d in alive}
        if len(holding) <= share:
            return
        for device, entry in sorted(holding.items()):
            if entry.worker.idle:
                log.info("device %s: handing it to another worker (holding %d, fair share %d)",
                         device, len(holding), share)
                entry.stopping = True
                entry.worker.post(Stop(EndReason.SHUTDOWN))
                return

    def _set_aside(self, device: str, kind: str, detail: str) -> None:
        self._quarantine[device] = self._clock() + QUARANTINE_S
        self._bad_input.report(kind, device.encode(), "device %s: cannot use its stream (%s); "
                               "trying again in %.0f s", device, detail, QUARANTINE_S)

    def _keep_leases(self) -> None:
        owned = [(d, e) for d, e in self._snapshot().items() if not e.stopping]
        renewed = self._leases.renew_all([e.lease for _, e in owned])
        for (device, entry), ok in zip(owned, renewed, strict=True):
            if not ok:
                # Someone else holds it now: stop streaming this device at once.
                log.warning("device %s: lease lost; stopping", device)
                self._stop_fenced(device, entry)

    def _stop_fenced(self, device: str, entry: _Owned) -> None:
        if not entry.stopping:
            entry.stopping = True
            entry.worker.post(Stop(EndReason.SHUTDOWN))

    def _on_fenced(self, lease: Lease, refused: int) -> None:
        """The publisher's write was refused: another worker owns the device now."""
        self._metrics.errors.labels(lease.device, "fenced").inc(refused)
        entry = self._snapshot().get(lease.device)
        if entry is not None and entry.lease == lease:  # not a later adoption of the device
            self._stop_fenced(lease.device, entry)

    def _adopt(self, device: str, lease: Lease) -> None:
        key = self._keys.audio(device)
        self._ensure_group(key)
        self._claim_pending(device, key)
        publisher = Publisher(self._redis, self._keys, device, self._settings.consumer_group,
                              self._clock, guard=self._leases.guard(lease),
                              on_fenced=lambda refused: self._on_fenced(lease, refused))
        io = DeviceIO(device, publisher, self._metrics, clock=self._clock, wall=self._wall,
                      problems=self._problems)
        vad_settings = VadSettings(mode=self._settings.vad_mode)
        worker = DeviceWorker(
            device, self._settings.lifecycle, open_session=self._open_session,
            vad=VoiceActivity(vad_settings), vad_window_ms=vad_settings.onset_window_ms,
            budget=self._budget, io=io, clock=self._clock,
            format_turns=self._settings.format_turns,
        )
        with self._lock:
            self._devices[device] = _Owned(worker, lease, publisher, "0", self._clock())
        publisher.start()
        worker.start()
        log.info("device %s: adopted (lease token %d)", device, lease.token)

    def _ensure_group(self, key: str) -> None:
        ensure_group(self._redis, key, self._settings.consumer_group)

    def _claim_pending(self, device: str, key: str) -> None:
        """Take over entries a previous owner read but never acknowledged (it died)."""
        claimed = claim_pending(self._redis, key, self._settings.consumer_group,
                                self._settings.worker_id, self._settings.lifecycle.stale_after_s)
        for reason, count in (("stale", claimed.stale), ("trimmed", claimed.trimmed)):
            if count:
                self._metrics.frames_skipped.labels(device, reason).inc(count)
        if claimed.entries or claimed.stale or claimed.trimmed:
            log.info("device %s: took over %d unacknowledged entries (and skipped %d stale; %d "
                     "were trimmed from the stream before anyone used them)", device,
                     claimed.entries, claimed.stale, claimed.trimmed)

    def _let_go(self, device: str, entry: _Owned) -> None:
        with self._lock:
            self._devices.pop(device, None)
        entry.publisher.close()
        with contextlib.suppress(*REDIS_ERRORS, redis.ResponseError):  # it expires by itself
            self._leases.release(entry.lease)
        log.info("device %s: released", device)

    def _snapshot(self) -> dict[str, _Owned]:
        with self._lock:
            return dict(self._devices)

    # --- reading ---------------------------------------------------------------------------

    def _read(self) -> None:
        owned = {d: e for d, e in self._snapshot().items() if not e.stopping}
        if not owned:
            self._stop_io.wait(READ_BLOCK_MS / 1000)
            return
        streams = {self._keys.audio(d): e.read_from for d, e in owned.items()}
        replaying = any(e.read_from != ">" for e in owned.values())
        try:
            reply: Any = self._redis.xreadgroup(
                self._settings.consumer_group, self._settings.worker_id, streams,  # type: ignore[arg-type]
                count=READ_COUNT, block=None if replaying else READ_BLOCK_MS)
        except REDIS_ERRORS:
            # The read may have been executed with its reply lost (a timeout while Redis
            # stalled): those entries are pending for us but never arrived. Read our pending
            # entries after the last one each device got, then go on with new ones.
            for owner in owned.values():
                if owner.read_from == ">":
                    owner.read_from = owner.last_id
            raise
        except redis.ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                self._drop_unusable_streams(owned)
                return
            if "UNBLOCKED" in str(exc):  # a stream deleted while we waited: see the next read
                return
            if "NOGROUP" not in str(exc):
                raise
            # The stream or its group vanished (deleted, or Redis lost its data): recreate.
            self._problems.warning("nogroup", "a device stream lost its consumer group; "
                                   "recreating (%s)", exc)
            for key in streams:
                with contextlib.suppress(redis.ResponseError):  # WRONGTYPE: the next read
                    self._ensure_group(key)
            return
        self._last_redis_ok = self._clock()
        self._dispatch(owned, reply)

    def _dispatch(self, owned: dict[str, _Owned], reply: Any) -> None:
        """Hand what was read to each device, in order."""
        seen: set[str] = set()
        for raw_key, entries in reply or []:
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            device = self._keys.device_of_audio_key(key)
            entry = owned.get(device or "")
            if device is None or entry is None:
                continue
            if not entries:
                continue
            seen.add(device)
            entry.last_frame_at = self._clock()
            last = entries[-1][0]
            entry.last_id = last.decode() if isinstance(last, bytes) else str(last)
            if entry.read_from != ">":
                entry.read_from = entry.last_id
            entry.worker.post(Frames([(eid, _decode(fields)) for eid, fields in entries]))
        for device, entry in owned.items():
            if entry.read_from != ">" and device not in seen:
                entry.read_from = ">"  # our pending entries are all replayed

    def _drop_unusable_streams(self, owned: dict[str, _Owned]) -> None:
        """A device's stream key was replaced by another type: let that device go, not all."""
        for device, entry in owned.items():
            kind = self._redis.type(self._keys.audio(device))
            if kind not in (b"stream", "stream", b"none", "none"):
                self._set_aside(device, "stream_wrong_type", f"the key holds a {kind!r}")
                entry.stopping = True
                entry.worker.post(Stop(EndReason.END_OF_STREAM))


def _decode(fields: dict[bytes, bytes] | None) -> AudioFrame | EndOfStream | MalformedEntry:
    if fields is None:  # an entry that was deleted while pending
        return MalformedEntry("deleted", "entry no longer in the stream")
    try:
        return decode_entry(fields)
    except MalformedEntry as exc:
        return exc
