"""Redis outages during a real-time capture: the local buffer, the backlog, exact loss accounting.

Redis runs with an fsync'ed append-only file, so the stream survives the restart and the test can
read every entry the capture ever wrote.
"""

from __future__ import annotations

import threading
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from capture.config import CaptureSettings
from capture.contract import FRAME_US, AudioFrame, EndOfStream, Keys, decode_entry
from capture.framing import SystemClock
from capture.service import CaptureService, build_source, redis_factory_for
from tests.support.redisserver import RedisServer
from tests.support.speech import write_wav

pytestmark = pytest.mark.slow




class Capture:
    """A real-time WAV capture running in a thread, observed from the test."""

    def __init__(self, server: RedisServer, wav: Path, **env: str) -> None:
        settings = CaptureSettings.from_env({
            "REDIS_URL": server.url, "DEVICE_ID": "outage", "METRICS_PORT": "0",
            "CAPTURE_FILE": str(wav), **env})
        clock = SystemClock()
        self.registry = CollectorRegistry()
        self.service = CaptureService(
            settings, source=build_source(settings, clock),
            redis_factory=redis_factory_for(server.url), registry=self.registry, clock=clock,
            stop=threading.Event())
        self.status: int | None = None
        self.thread = threading.Thread(target=self._run, name="capture-under-test")

    def _run(self) -> None:
        self.status = self.service.run()

    def metric(self, name: str, **labels: str) -> int:
        value = self.registry.get_sample_value(name, {"device": "outage", **labels})
        assert value is not None, name
        return int(value)


def wait_until(predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def read_all(server: RedisServer) -> tuple[list[AudioFrame], EndOfStream]:
    client = server.client()
    try:
        entries = [decode_entry(f) for _id, f in client.xrange(Keys().audio("outage"))]
    finally:
        client.close()
    *frames, eos = entries
    assert isinstance(eos, EndOfStream), "the end-of-stream entry is last"
    assert all(isinstance(f, AudioFrame) for f in frames)
    return [f for f in frames if isinstance(f, AudioFrame)], eos


def test_redis_down_10s_mid_capture_loses_no_frame(durable_redis: RedisServer,
                                                   tmp_path: Path) -> None:
    source = (np.random.default_rng(3).standard_normal(20 * 16_000) * 2000).astype("<i2")
    capture = Capture(durable_redis, write_wav(tmp_path / "20s.wav", source))
    capture.thread.start()
    wait_until(lambda: capture.metric("capture_frames_published_total") >= 40, 5)

    durable_redis.stop()
    down_at = time.monotonic()
    time.sleep(10)
    buffered_before_restart = capture.metric("capture_buffered_frames")
    durable_redis.start()
    up_at = time.monotonic()
    wait_until(lambda: capture.metric("capture_buffered_frames") <= 2, 10)
    caught_up_s = time.monotonic() - up_at
    capture.thread.join(30)
    assert capture.status == 0

    frames, eos = read_all(durable_redis)
    published = capture.metric("capture_frames_published_total")
    dropped = sum(capture.metric("capture_frames_dropped_total", reason=r)
                  for r in ("overflow", "device", "buffer_full", "shutdown"))
    print(f"\noutage {up_at - down_at:.1f} s: {published} frames published, "
          f"{capture.service.buffer.high_water} max buffered ({buffered_before_restart} at "
          f"restart), {dropped} dropped, backlog written {caught_up_s:.2f} s after restart, "
          f"{capture.metric('capture_redis_errors_total')} failed writes")

    assert [f.seq for f in frames] == list(range(400))  # continuous, no duplicates
    assert b"".join(f.pcm for f in frames) == source.tobytes()  # bit-exact
    assert [f.ts_us - frames[0].ts_us for f in frames] == [n * FRAME_US for n in range(400)]
    assert eos.seq == 400
    assert published == 400 and dropped == 0
    assert buffered_before_restart >= 180  # ~10 s of audio waited in the local buffer
    assert capture.service.buffer.high_water >= 180


def test_redis_down_longer_than_the_buffer_counts_every_lost_frame(
        durable_redis: RedisServer, tmp_path: Path) -> None:
    source = (np.random.default_rng(4).standard_normal(8 * 16_000) * 2000).astype("<i2")
    capture = Capture(durable_redis, write_wav(tmp_path / "8s.wav", source),
                      CAPTURE_BUFFER_S="2")  # 40 frames
    capture.thread.start()
    wait_until(lambda: capture.metric("capture_frames_published_total") >= 20, 5)

    durable_redis.stop()
    time.sleep(4)  # 80 frames of audio against a 40-frame buffer
    durable_redis.start()
    capture.thread.join(30)
    assert capture.status == 0

    frames, eos = read_all(durable_redis)
    captured = capture.metric("capture_frames_total")
    published = capture.metric("capture_frames_published_total")
    full = capture.metric("capture_frames_dropped_total", reason="buffer_full")
    seqs = [f.seq for f in frames]
    gaps = sum(b - a - 1 for a, b in pairwise(seqs))
    print(f"\nbuffer 40 frames, outage 4 s: captured {captured}, published {published}, "
          f"dropped {full}, seq gaps {gaps}")

    assert captured == 160 and eos.seq == 160
    assert full > 0
    assert captured - published == full
    assert gaps == full and len(frames) == published
    assert capture.metric("capture_frames_dropped_total", reason="shutdown") == 0
    # The oldest frames went: one contiguous gap, and what is kept is bit-exact.
    assert sum(1 for a, b in pairwise(seqs) if b - a > 1) == 1
    pcm = source.tobytes()
    for frame in frames:
        assert frame.pcm == pcm[frame.seq * 1600:(frame.seq + 1) * 1600]
