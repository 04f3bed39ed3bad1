"""The microphone path: a real PulseAudio null sink played into with paplay, and PyAudio doubles
for what a null sink cannot do (a device without 16 kHz mono, input overflows)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from capture.buffer import FrameBuffer
from capture.common.errors import ConfigError
from capture.contract import FRAME_US, AudioFrame, EndOfStream, Keys, decode_entry
from capture.framing import Framer
from capture.metrics import CaptureMetrics
from capture.mic import PA_INPUT_OVERFLOW, MicSource
from tests.support.pulse import PulseServer
from tests.support.redisserver import RedisServer
from tests.support.speech import compose, write_wav
from tests.support.tools import require_tool

# ---------------------------------------------------------------------------- doubles


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now


class FakeStream:
    def __init__(self, callback: Callable[..., Any]) -> None:
        self.callback = callback
        self.closed = False

    def is_active(self) -> bool:
        return not self.closed

    def stop_stream(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class FakePyAudio:
    """Two input devices; the USB one takes only 48 kHz stereo, like many real ones."""

    devices = (
        {"index": 0, "name": "HDA Intel PCH: ALC3246 Analog", "maxInputChannels": 2,
         "defaultSampleRate": 44100.0},
        {"index": 1, "name": "HDMI out", "maxInputChannels": 0, "defaultSampleRate": 48000.0},
        {"index": 2, "name": "USB Audio Device", "maxInputChannels": 2,
         "defaultSampleRate": 48000.0},
    )

    def __init__(self) -> None:
        self.opened: list[dict[str, Any]] = []
        self.streams: list[FakeStream] = []

    def get_device_count(self) -> int:
        return len(self.devices)

    def get_device_info_by_index(self, index: int) -> dict[str, Any]:
        return dict(self.devices[index])

    def get_default_input_device_info(self) -> dict[str, Any]:
        return dict(self.devices[0])

    def is_format_supported(self, rate: int, *, input_device: int, input_channels: int,
                            input_format: int) -> bool:
        if input_device == 2 and (rate, input_channels) != (48_000, 2):
            msg = "Invalid sample rate"
            raise ValueError(msg)
        return True

    def open(self, **kwargs: Any) -> FakeStream:
        self.opened.append(kwargs)
        stream = FakeStream(kwargs["stream_callback"])
        self.streams.append(stream)
        return stream

    def terminate(self) -> None:
        pass


class MicRun:
    """A MicSource running in a thread against a FakePyAudio, fed by the test."""

    def __init__(self, selector: str | None) -> None:
        self.pa = FakePyAudio()
        self.clock = FakeClock()
        self.registry = CollectorRegistry()
        self.metrics = CaptureMetrics(self.registry, "fake")
        self.buffer = FrameBuffer(1000)
        self.framer = Framer("r1", self.clock, self.buffer, self.metrics)
        self.mic = MicSource(selector, setting="--device", pa_factory=lambda: self.pa,
                             clock=self.clock, quiet=False)
        self.mic.open()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.mic.run, args=(self.framer, self.stop))

    def __enter__(self) -> MicRun:
        self.thread.start()
        deadline = time.monotonic() + 5
        while not self.pa.streams:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)

    def deliver(self, data: bytes, frames: int, status: int = 0) -> None:
        """PortAudio's thread: a chunk of ``frames`` sample frames ends now."""
        self.clock.now += frames / self.pa.opened[-1]["rate"]
        self.pa.streams[-1].callback(data, frames, {}, status)

    def frames(self) -> list[AudioFrame]:
        return self.buffer.take(10_000, 0)

    def dropped(self, reason: str) -> float:
        return self.registry.get_sample_value(
            "capture_frames_dropped_total", {"device": "fake", "reason": reason}) or 0.0


# ---------------------------------------------------------------------------- doubles: tests


def test_device_is_chosen_by_index_or_name_substring() -> None:
    assert MicRun("2").mic.description == "mic:USB Audio Device"
    assert MicRun("usb").mic.description == "mic:USB Audio Device"
    assert MicRun(None).mic.description == "mic:HDA Intel PCH: ALC3246 Analog"
    with pytest.raises(ConfigError, match=r"--device: no input device matches 'hdmi'"):
        MicRun("hdmi")  # an output-only device is no input
    with pytest.raises(ConfigError, match="matches several input devices"):
        MicRun("a")


def test_a_48k_stereo_only_device_is_resampled_to_16k_mono() -> None:
    with MicRun("usb") as run:
        assert (run.pa.opened[0]["rate"], run.pa.opened[0]["channels"]) == (48_000, 2)
        t = np.arange(48_000) / 48_000
        tone = np.rint(8000 * np.sin(2 * np.pi * 440 * t)).astype("<i2")
        stereo = np.stack([tone, tone], axis=1)
        for start in range(0, 48_000, 2400):  # 50 ms callbacks
            run.deliver(stereo[start:start + 2400].tobytes(), 2400)
    frames = run.frames()
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert 19 <= len(frames) <= 20  # 1 s, less the resampler's delay still held back
    got = np.frombuffer(b"".join(f.pcm for f in frames), dtype="<i2")
    expected = np.rint(8000 * np.sin(2 * np.pi * 440 * np.arange(len(got)) / 16_000))
    middle = slice(800, len(got) - 800)
    assert np.abs(got[middle] - expected[middle]).max() <= 40  # same tone, same phase


def test_input_overflow_skips_the_lost_frames_and_counts_them() -> None:
    chunk = np.full(800, 1000, dtype="<i2").tobytes()  # 50 ms at 16 kHz
    with MicRun("0") as run:
        assert run.pa.opened[0]["rate"] == 16_000
        for _ in range(4):
            run.deliver(chunk, 800)
        run.clock.now += 0.150  # 3 frames' worth of audio lost inside PortAudio
        run.deliver(chunk, 800, status=PA_INPUT_OVERFLOW)
        run.deliver(chunk, 800)
    frames = run.frames()
    assert [f.seq for f in frames] == [0, 1, 2, 3, 7, 8]
    assert frames[4].ts_us - frames[0].ts_us == 7 * FRAME_US
    assert run.dropped("overflow") == 3


def test_a_stream_that_dies_is_reopened_and_the_gap_counted() -> None:
    chunk = np.full(800, 1000, dtype="<i2").tobytes()
    with MicRun("0") as run:
        run.deliver(chunk, 800)
        run.deliver(chunk, 800)
        run.pa.streams[0].close()  # the device went away
        deadline = time.monotonic() + 5
        while len(run.pa.streams) < 2:  # reopened after a backoff
            assert time.monotonic() < deadline
            time.sleep(0.01)
        run.clock.now += 1.0  # a second without audio
        run.deliver(chunk, 800)
    assert [f.seq for f in run.frames()] == [0, 1, 22]
    assert run.dropped("device") == 20


# ---------------------------------------------------------------------------- real PulseAudio


@pytest.fixture
def pulse() -> Iterator[PulseServer]:
    require_tool("paplay")
    server = PulseServer(require_tool("pulseaudio"), require_tool("pactl"))
    server.start()
    try:
        yield server
    finally:
        server.close()


def _capture(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "capture", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.mic
def test_devices_are_listed_and_an_unknown_one_is_a_config_error(pulse: PulseServer) -> None:
    listing = subprocess.run([sys.executable, "-m", "capture", "--list-devices"], env=pulse.env,
                             capture_output=True, text=True, timeout=30, check=True)
    assert "pulse" in listing.stdout and "default" in listing.stdout
    bad = subprocess.run([sys.executable, "-m", "capture", "--device", "no-such-mic"],
                         env={**pulse.env, "METRICS_PORT": "0"}, capture_output=True, text=True,
                         timeout=30, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "error: --device: no input device matches 'no-such-mic'" in bad.stderr


@pytest.mark.mic
@pytest.mark.slow
def test_microphone_frames_equal_the_played_audio(
        pulse: PulseServer, redis_server: RedisServer, redis_client: redis.Redis,
        tmp_path: Path) -> None:
    played = compose(0.3, "four two seven", 0.2, "one nine", 0.3)
    wav = write_wav(tmp_path / "played.wav", played)
    key = Keys().audio("mic-dev")
    env = {**pulse.env, "REDIS_URL": redis_server.url, "DEVICE_ID": "mic-dev",
           "METRICS_PORT": "0"}
    proc = _capture([], env)
    try:
        deadline = time.monotonic() + 15
        while redis_client.xlen(key) < 5:  # capturing (digital silence) before we play
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no frames from the microphone"
            time.sleep(0.05)
        subprocess.run([require_tool("paplay"), str(wav)], env=pulse.env, check=True, timeout=30)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err

    *entries, eos = [decode_entry(f) for _id, f in redis_client.xrange(key)]
    assert isinstance(eos, EndOfStream)
    frames = [f for f in entries if isinstance(f, AudioFrame)]
    assert len(frames) == len(entries)
    assert [f.seq for f in frames] == list(range(len(frames))) and eos.seq == len(frames)
    assert [f.ts_us - frames[0].ts_us for f in frames] == [
        n * FRAME_US for n in range(len(frames))]
    assert abs(frames[0].ts_us / 1e6 - time.time()) < 60

    got = np.frombuffer(b"".join(f.pcm for f in frames), dtype="<i2")
    # paplay drops the first ~30 ms of a stream (inside our leading silence): align on the
    # first sound, then require the speech sample for sample.
    first_played = int(np.flatnonzero(played)[0])
    first_got = int(np.flatnonzero(got)[0])
    speech = played[first_played:int(np.flatnonzero(played)[-1]) + 1]
    captured = got[first_got:first_got + len(speech)]
    assert len(captured) == len(speech), "capture stopped before the end of the speech"
    assert np.array_equal(captured, speech)
