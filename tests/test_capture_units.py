"""Pieces of capture on their own: settings, the frame buffer's drop policy, time stamps."""

from __future__ import annotations

import argparse
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from capture.buffer import FrameBuffer
from capture.cli import parse_args
from capture.common.errors import ConfigError
from capture.config import CaptureSettings
from capture.contract import FRAME_BYTES, FRAME_US, AudioFrame
from capture.framing import Framer
from capture.metrics import CaptureMetrics
from capture.service import REDIS_RECENT_S, CaptureService, redis_factory_for
from tests.support.redisserver import RedisServer


def frame(seq: int) -> AudioFrame:
    return AudioFrame(run="r", seq=seq, ts_us=seq * FRAME_US, pcm=bytes(FRAME_BYTES))


def test_settings_defaults_and_flag_precedence() -> None:
    env = {"REDIS_URL": "redis://:hunter22@redis:6379/0", "DEVICE_ID": "from-env",
           "METRICS_PORT": "9200", "CAPTURE_RETENTION_S": "30", "CAPTURE_BUFFER_S": "10"}
    settings = CaptureSettings.from_env(env, parse_args(["--device-id", "from-flag"]))
    assert settings.device_id == "from-flag" and settings.metrics_port == 9200
    assert (settings.retention_frames, settings.buffer_frames) == (600, 200)
    assert settings.realtime and settings.file is None and settings.input_device is None
    assert "hunter22" not in repr(settings)
    assert settings.redis_url_safe == "redis://:***@redis:6379/0"
    assert settings.setting_name("input_device") == "CAPTURE_INPUT_DEVICE"

    defaults = CaptureSettings.from_env({}, None, hostname=lambda: "edge-01.local")
    assert defaults.device_id == "edge-01.local"
    assert (defaults.redis_url, defaults.namespace) == ("redis://localhost:6379/0", "edgescribe:")
    assert (defaults.metrics_port, defaults.retention_s, defaults.buffer_s) == (9101, 60, 120)


def test_a_host_name_that_is_no_device_id_asks_for_device_id() -> None:
    with pytest.raises(ConfigError, match="DEVICE_ID: not set, and the host name 'a b'"):
        CaptureSettings.from_env({}, None, hostname=lambda: "a b")


def test_no_realtime_flag_and_variable(tmp_path: Path) -> None:
    from tests.support.speech import silence, write_wav

    wav = str(write_wav(tmp_path / "s.wav", silence(0.1)))
    assert not CaptureSettings.from_env({}, parse_args(["--file", wav, "--no-realtime"])).realtime
    assert not CaptureSettings.from_env({"CAPTURE_FILE": wav, "CAPTURE_REALTIME": "0"}).realtime
    settings = CaptureSettings.from_env({"CAPTURE_FILE": wav}, argparse.Namespace())
    assert settings.realtime and settings.file == Path(wav)


def test_full_buffer_drops_the_oldest_waiting_frame_never_one_in_flight() -> None:
    buffer = FrameBuffer(8)  # batches of at most 2
    for seq in range(8):
        assert buffer.push(frame(seq)) == 0
    assert [f.seq for f in buffer.take(100, 0)] == [0, 1]  # in flight, write failing
    assert buffer.push(frame(8)) == 1
    assert buffer.push(frame(9)) == 1
    assert [f.seq for f in buffer.take(100, 0)] == [0, 1]  # the retry gets the same batch
    assert buffer.commit() == 2
    assert [f.seq for f in buffer.take(100, 0)] == [4, 5]  # 2 and 3 were dropped
    assert buffer.dropped == 2 and len(buffer) == 6 and buffer.high_water == 8


def test_time_stamps_follow_the_sample_count_not_the_clock() -> None:
    class Clock:
        now = 50.0

        def monotonic(self) -> float:
            return self.now

        def wall(self) -> float:
            return 1_700_000_000.0 + self.now

    clock = Clock()
    registry = CollectorRegistry()
    buffer = FrameBuffer(100)
    framer = Framer("r", clock, buffer, CaptureMetrics(registry, "d"))
    framer.start(50.25)  # first sample captured 250 ms after the anchor
    for _ in range(5):
        clock.now += 0.37  # irregular hand-over times change nothing
        framer.write(bytes(FRAME_BYTES // 2 * 3))  # 75 ms per write
    eos = framer.finish()  # 375 ms: 7 whole frames + half a frame padded
    frames = buffer.take(100, 0)
    t0 = 1_700_000_050_250_000
    assert [f.ts_us for f in frames] == [t0 + n * FRAME_US for n in range(8)]
    assert frames[-1].pcm == bytes(FRAME_BYTES)
    assert (eos.seq, eos.ts_us) == (8, t0 + 8 * FRAME_US)


class _FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now


class _QueueSource:
    """Audio handed in by the test, on the source's own thread."""

    description = "test:queue"

    def __init__(self, clock: _FakeClock) -> None:
        self.clock = clock
        self.chunks: queue.Queue[bytes] = queue.Queue()

    def run(self, framer: Framer, stop: threading.Event) -> None:
        framer.start(self.clock.monotonic())
        while not stop.is_set():
            try:
                framer.write(self.chunks.get(timeout=0.05))
            except queue.Empty:
                continue

    def feed(self, frames: int) -> None:
        self.chunks.put(bytes(FRAME_BYTES * frames))


def test_health_needs_audio_and_either_recent_redis_or_room_in_the_buffer(
        redis_server: RedisServer) -> None:
    clock = _FakeClock()
    source = _QueueSource(clock)
    settings = CaptureSettings.from_env({"REDIS_URL": redis_server.url, "DEVICE_ID": "h",
                                         "METRICS_PORT": "0", "CAPTURE_BUFFER_S": "1",
                                         "CAPTURE_FLUSH_TIMEOUT_S": "0.2"})
    stop = threading.Event()
    service = CaptureService(settings, source=source, redis_factory=redis_factory_for(
        redis_server.url), registry=CollectorRegistry(), clock=clock, stop=stop)
    thread = threading.Thread(target=service.run)
    thread.start()
    try:
        def settle(predicate: Callable[[], bool]) -> None:
            deadline = time.monotonic() + 5
            while not predicate():
                assert time.monotonic() < deadline
                time.sleep(0.01)

        source.feed(5)
        settle(lambda: service.publisher.published == 5)
        assert service.health()[0]
        clock.now += 6  # the source went quiet
        assert not service.health()[0]
        source.feed(1)
        settle(lambda: service.publisher.published == 6)
        assert service.health()[0]
        redis_server.stop()
        source.feed(30)  # more than the 20-frame buffer holds
        settle(lambda: service.buffer.dropped > 0)
        assert service.health()[0]  # Redis was fine a moment ago
        clock.now += REDIS_RECENT_S + 1
        source.feed(1)  # the source is alive ...
        settle(lambda: service.framer.last_audio == clock.now)
        ok, detail = service.health()
        assert not ok  # ... but audio is being lost
        assert detail["buffered"] == detail["capacity"] == 20
    finally:
        stop.set()
        thread.join(15)
