"""The publisher thread: buffered frames to the device's Redis stream, in order, exactly once.

* Pipelined (``transaction=False``): a batch of up to ``batch_frames`` XADDs per round trip, so a
  two-minute backlog is written in well under a second once Redis is back.
* Trimmed with ``XADD ... MAXLEN ~ retention_s * 20``: one entry is 50 ms of audio, so a length
  cap *is* an audio-time cap, independent of clocks, and the ``~`` lets Redis trim whole nodes
  cheaply. (MINID would need time-derived entry ids, which a backlog or a replay faster than
  real time would break.)
* No duplicates: a pipeline whose reply was lost may have been written in part. After any
  failure, the stream's last entry is read first; in-flight frames whose seq it already covers
  (same ``run``) are counted as published, not sent again. redis-py's own retry is off, so the
  library never re-sends a pipeline behind our back.
* The registry record (``ns:devices``) rides along every ``heartbeat_s``.
* Supervised: any Redis error backs off with jitter and retries the same batch; capture goes on
  into the FrameBuffer meanwhile.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import redis

from capture.buffer import FrameBuffer
from capture.common.redisconn import REDIS_ERRORS
from capture.common.supervise import Backoff, start_thread, supervise
from capture.contract import (
    FRAME_US,
    HEARTBEAT_INTERVAL_S,
    AudioFrame,
    DeviceRecord,
    EndOfStream,
    Keys,
)
from capture.framing import Clock
from capture.metrics import DROP_SHUTDOWN, CaptureMetrics

log = logging.getLogger(__name__)

RedisFactory = Callable[[], redis.Redis]
_RETRY_ON: tuple[type[BaseException], ...] = (*REDIS_ERRORS, redis.RedisError)


class Publisher:
    def __init__(
        self, *, keys: Keys, device_id: str, record: DeviceRecord, buffer: FrameBuffer,
        redis_factory: RedisFactory, metrics: CaptureMetrics, clock: Clock,
        retention_frames: int, batch_frames: int, backoff: Backoff | None = None,
        heartbeat_s: float = HEARTBEAT_INTERVAL_S / 2,
    ) -> None:
        self._stream = keys.audio(device_id)
        self._devices_key = keys.devices
        self._device_id = device_id
        self._record = record
        self._buffer = buffer
        self._redis_factory = redis_factory
        self._metrics = metrics
        self._clock = clock
        self._maxlen = retention_frames
        self._batch_frames = batch_frames
        self._backoff = backoff or Backoff(initial_s=0.1, cap_s=2.0)
        self._heartbeat_s = heartbeat_s
        self._client: redis.Redis | None = None
        self._halt = threading.Event()  # ends the loop: EOS written, or shutdown gave up
        self._eos_written = threading.Event()
        self._eos: EndOfStream | None = None
        self._thread: threading.Thread | None = None
        self._next_heartbeat = 0.0
        self._check_tail = False
        self._outage_since: float | None = None
        self._drops_seen = 0
        self._drops_at_episode_start: int | None = None
        self.published = 0
        self.last_ok: float | None = None
        """Monotonic time of the last successful Redis write."""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = start_thread("publisher", self._loop)

    def finish(self, eos: EndOfStream, timeout: float) -> bool:
        """Write what is buffered, then ``eos``, within ``timeout`` seconds; True on success.

        Call after the buffer is closed. Whatever is still buffered at the deadline is lost and
        counted as ``dropped{reason="shutdown"}``.
        """
        self._eos = eos
        written = self._eos_written.wait(timeout)
        self._halt.set()
        if self._thread is not None:
            self._thread.join(2.0)
            if self._thread.is_alive():
                log.warning("publisher still blocked in a Redis call; abandoning it")
                self._count_lost_at_shutdown()
        if not written:
            log.error("shutdown: could not write the end-of-stream entry within %.1f s "
                      "(Redis unavailable?)", timeout)
        return written

    def _loop(self) -> None:
        supervise("publisher", self._step, self._halt, retry_on=_RETRY_ON,
                  backoff=self._backoff, on_error=self._on_error)
        self._count_lost_at_shutdown()
        self._close_client()

    # ------------------------------------------------------------------ one round

    def _step(self) -> None:
        client = self._client or self._connect()
        batch = self._buffer.take(self._batch_frames, self._wait_s())
        if self._check_tail:
            batch = self._skip_written(client, batch)
            self._check_tail = False
            if self._eos_written.is_set():
                self._halt.set()
                return
        now_mono = self._clock.monotonic()
        heartbeat = now_mono >= self._next_heartbeat
        eos = self._eos if self._ready_for_eos(batch) else None
        if not batch and not heartbeat and eos is None:
            self._note_drops()
            return
        pipe = client.pipeline(transaction=False)
        entries: list[AudioFrame | EndOfStream] = [*batch, eos] if eos is not None else [*batch]
        for entry in entries:
            fields: dict[Any, Any] = entry.to_fields()  # redis-py's dict type is invariant
            pipe.xadd(self._stream, fields, maxlen=self._maxlen, approximate=True)
        if heartbeat or eos is not None:
            record = replace(self._record, seen=self._clock.wall())
            pipe.hset(self._devices_key, self._device_id, record.to_json())
        pipe.execute()
        self._succeeded(batch, now_mono)
        if heartbeat:
            self._next_heartbeat = now_mono + self._heartbeat_s
        if eos is not None:
            self._eos_written.set()
            self._halt.set()

    def _ready_for_eos(self, batch: list[AudioFrame]) -> bool:
        return (self._eos is not None and self._buffer.closed
                and len(self._buffer) == len(batch))

    def _wait_s(self) -> float:
        if self._eos is not None:
            return 0.02
        until_heartbeat = self._next_heartbeat - self._clock.monotonic()
        return min(0.25, max(0.0, until_heartbeat))

    def _skip_written(self, client: redis.Redis, batch: list[AudioFrame]) -> list[AudioFrame]:
        """Drop the batch's prefix that the stream's last entry shows as already written."""
        top: Any = client.xrevrange(self._stream, count=1)
        if not top:
            return batch
        fields: dict[bytes, bytes] = top[0][1]
        if fields.get(b"run") != self._record.run.encode():
            return batch
        try:
            last_seq = int(fields[b"seq"])
        except (KeyError, ValueError):
            return batch
        if b"eos" in fields:
            self._eos_written.set()
        written = 0
        while written < len(batch) and batch[written].seq <= last_seq:
            written += 1
        if written:
            log.info("%d frames of the failed write had reached Redis; not sending them again",
                     written)
            self._account_published(batch[:written])
        return batch[written:]

    # ------------------------------------------------------------------ bookkeeping

    def _succeeded(self, batch: list[AudioFrame], now_mono: float) -> None:
        self.last_ok = now_mono
        self._metrics.redis_up.set(1)
        if self._outage_since is not None:
            log.info("Redis reachable again after %.1f s; catching up on %d buffered frames",
                     now_mono - self._outage_since, len(self._buffer))
            self._outage_since = None
        self._account_published(batch)
        self._note_drops()

    def _account_published(self, frames: list[AudioFrame]) -> None:
        committed = self._buffer.commit(len(frames))
        self.published += committed
        self._metrics.published.inc(committed)
        if frames:
            newest_end_s = (frames[-1].ts_us + FRAME_US) / 1_000_000
            self._metrics.lag.set(max(0.0, self._clock.wall() - newest_end_s))

    def _on_error(self, exc: BaseException) -> None:
        self._metrics.redis_errors.inc()
        self._metrics.redis_up.set(0)
        self._check_tail = True
        self._close_client()
        if self._outage_since is None:
            self._outage_since = self._clock.monotonic()
            log.warning("Redis write failed: buffering locally (up to %d frames, %.0f s of audio)",
                        self._buffer.capacity, self._buffer.capacity * FRAME_US / 1e6)
        self._note_drops()

    def _note_drops(self) -> None:
        """Log a drop episode once when it starts and once with its total when caught up."""
        dropped = self._buffer.dropped
        if dropped > self._drops_seen and self._drops_at_episode_start is None:
            self._drops_at_episode_start = self._drops_seen
            log.error("local buffer full (%d frames): dropping the oldest audio until Redis "
                      "catches up", self._buffer.capacity)
        self._drops_seen = dropped
        if (self._drops_at_episode_start is not None and self._outage_since is None
                and len(self._buffer) <= self._buffer.max_batch):
            log.warning("caught up with Redis: %d frames were dropped (buffer full)",
                        dropped - self._drops_at_episode_start)
            self._drops_at_episode_start = None

    def _count_lost_at_shutdown(self) -> None:
        lost = self._buffer.discard_all()
        if lost:
            self._metrics.dropped[DROP_SHUTDOWN].inc(lost)
            log.error("shutdown: %d buffered frames could not be written and are lost", lost)

    def _connect(self) -> redis.Redis:
        self._client = self._redis_factory()
        return self._client

    def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except _RETRY_ON as exc:
                log.debug("closing the Redis client: %s", exc)
