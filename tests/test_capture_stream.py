"""Capture → Redis stream contract: a real redis-server, WAV replay in-process, not real time."""

from __future__ import annotations

import subprocess
import threading
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import soxr
from prometheus_client import CollectorRegistry

from capture.config import CaptureSettings
from capture.contract import (
    FRAME_BYTES,
    FRAME_US,
    AudioFrame,
    DeviceRecord,
    EndOfStream,
    Keys,
    decode_entry,
)
from capture.framing import SystemClock
from capture.service import CaptureService, build_source, redis_factory_for
from tests.support.redisserver import RedisServer, free_port
from tests.support.speech import compose, write_wav
from tests.support.tools import require_tool

FRAME_FIELDS = {b"run", b"seq", b"ts", b"rate", b"ch", b"fmt", b"pcm"}
EOS_FIELDS = {b"run", b"seq", b"ts", b"eos"}


def settings_for(server: RedisServer, wav: Path, **extra: str) -> CaptureSettings:
    env = {"REDIS_URL": server.url, "DEVICE_ID": "test-dev", "METRICS_PORT": "0",
           "CAPTURE_FILE": str(wav), "CAPTURE_REALTIME": "false", **extra}
    return CaptureSettings.from_env(env)


def run_capture(settings: CaptureSettings, redis_factory: Any = None) -> CaptureService:
    clock = SystemClock()
    service = CaptureService(
        settings, source=build_source(settings, clock),
        redis_factory=redis_factory or redis_factory_for(settings.redis_url),
        registry=CollectorRegistry(), clock=clock, stop=threading.Event())
    assert service.run() == 0
    return service


def read_stream(client: redis.Redis, device: str = "test-dev") -> list[dict[bytes, bytes]]:
    return [fields for _id, fields in client.xrange(Keys().audio(device))]


def sample(service: CaptureService, name: str, **labels: str) -> float:
    value = service._registry.get_sample_value(
        name, {"device": service.settings.device_id, **labels})
    assert value is not None, name
    return value


def noise(seconds: float, rate: int = 16_000, channels: int = 1, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (round(seconds * rate), channels) if channels > 1 else round(seconds * rate)
    return (rng.standard_normal(shape) * 3000).clip(-32768, 32767).astype("<i2")


def check_contract(entries: list[dict[bytes, bytes]],
                   run: str) -> tuple[list[AudioFrame], EndOfStream]:
    """Field sets exact, seq from 0 without gaps, ts exactly 50 ms apart, EOS last."""
    *frames_raw, eos_raw = entries
    for fields in frames_raw:
        assert set(fields) == FRAME_FIELDS
    assert set(eos_raw) == EOS_FIELDS
    frames = [decode_entry(f) for f in frames_raw]
    eos = decode_entry(eos_raw)
    assert all(isinstance(f, AudioFrame) for f in frames)
    assert isinstance(eos, EndOfStream)
    audio = [f for f in frames if isinstance(f, AudioFrame)]
    assert [f.run for f in audio] == [run] * len(audio) and eos.run == run
    assert [f.seq for f in audio] == list(range(len(audio)))
    assert all(len(f.pcm) == FRAME_BYTES for f in audio)
    assert all((f.rate, f.channels, f.fmt) == (16_000, 1, "s16le") for f in audio)
    t0 = audio[0].ts_us
    assert [f.ts_us - t0 for f in audio] == [n * FRAME_US for n in range(len(audio))]
    assert (eos.seq, eos.ts_us) == (len(audio), t0 + len(audio) * FRAME_US)
    return audio, eos


@pytest.mark.slow
def test_wav_replay_follows_the_stream_contract_bit_exact(
        redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path) -> None:
    source = compose(0.2, "seven three one", 0.3, "nine", 0.113)  # not a whole number of frames
    wav = write_wav(tmp_path / "speech.wav", source)
    service = run_capture(settings_for(redis_server, wav))

    frames, _eos = check_contract(read_stream(redis_client), service.run_id)
    pcm = b"".join(f.pcm for f in frames)
    assert len(frames) == -(-len(source) // 800)
    assert pcm[:len(source) * 2] == source.tobytes()  # bit-exact
    assert pcm[len(source) * 2:] == bytes(len(pcm) - len(source) * 2)  # padded with silence

    record = DeviceRecord.from_json(redis_client.hget(Keys().devices, "test-dev") or b"")
    assert (record.run, record.rate, record.channels) == (service.run_id, 16_000, 1)
    assert record.source == "file:speech.wav" and record.seen >= record.started
    assert sample(service, "capture_frames_total") == len(frames)
    assert sample(service, "capture_frames_published_total") == len(frames)
    assert sample(service, "capture_buffered_frames") == 0
    for reason in ("overflow", "device", "buffer_full", "shutdown"):
        assert sample(service, "capture_frames_dropped_total", reason=reason) == 0


@pytest.mark.parametrize("fmt", [
    (44_100, 2, 2), (48_000, 1, 3), (22_050, 2, 1), (16_000, 2, 4), (8_000, 1, 2),
], ids=lambda f: f"{f[0]}Hz-{f[1]}ch-{8 * f[2]}bit")
def test_any_pcm_wav_is_converted_to_16k_mono(
        redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path,
        fmt: tuple[int, int, int]) -> None:
    rate, channels, width = fmt
    seconds = 1.5
    t = np.arange(round(seconds * rate)) / rate
    left = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1234 * t)
    signal = np.stack([left, 0.5 * left][:channels], axis=1)  # the channels differ
    path = tmp_path / "in.wav"
    scale = float(1 << (8 * width - 1))
    ints = np.clip(np.rint(signal * scale), -scale, scale - 1).astype(np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    else:
        raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints.reshape(-1))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(raw)

    service = run_capture(settings_for(redis_server, path))
    frames, _ = check_contract(read_stream(redis_client), service.run_id)
    got = np.frombuffer(b"".join(f.pcm for f in frames), dtype="<i2").astype(np.float64) / 32768

    mono = (ints.astype(np.float64) / scale).mean(axis=1)
    reference = soxr.resample(mono, rate, 16_000) if rate != 16_000 else mono
    assert len(frames) == -(-len(reference) // 800)
    diff = np.abs(got[:len(reference)] - reference)
    assert diff.max() < 4 / 32768  # rounding only
    assert not got[len(reference):].any()


def test_sox_written_24bit_extensible_wav_is_accepted(
        redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path) -> None:
    """sox writes 24-bit as WAVE_FORMAT_EXTENSIBLE, which Python 3.11's wave rejects alone."""
    src = write_wav(tmp_path / "src.wav", noise(1.0))
    ext = tmp_path / "ext.wav"
    subprocess.run([require_tool("sox"), str(src), "-b", "24", "-r", "48000", str(ext)],
                   check=True)
    assert ext.read_bytes()[20:22] == b"\xfe\xff"
    service = run_capture(settings_for(redis_server, ext))
    frames, _ = check_contract(read_stream(redis_client), service.run_id)
    assert len(frames) == 20


def test_stream_is_trimmed_to_the_retention(
        redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "long.wav", noise(30.0))
    run_capture(settings_for(redis_server, wav, CAPTURE_RETENTION_S="2"))
    length = redis_client.xlen(Keys().audio("test-dev"))
    # MAXLEN ~ 40: Redis trims whole nodes of up to 100 entries, so a little more stays.
    assert 40 <= length <= 140


class _LoseReplies:
    """A real client whose pipelines run on the server but whose replies get "lost" (raise).

    Lost: the first pipeline of the run, and the first that carries the end-of-stream entry.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.lost = 0
        self._first_done = False
        self._eos_done = False

    def __call__(self) -> Any:
        client = redis_factory_for(self.url)()
        outer = self
        real_pipeline = client.pipeline

        def pipeline(transaction: bool = True) -> Any:
            pipe = real_pipeline(transaction=transaction)
            real_execute = pipe.execute

            def execute(raise_on_error: bool = True) -> Any:
                has_eos = any(b"eos" in args or "eos" in args for args, _ in pipe.command_stack)
                result = real_execute(raise_on_error)
                if not outer._first_done or (has_eos and not outer._eos_done):
                    outer._first_done = True
                    outer._eos_done = outer._eos_done or has_eos
                    outer.lost += 1
                    raise redis.ConnectionError("reply lost (test)")
                return result

            pipe.execute = execute  # type: ignore[method-assign]
            return pipe

        client.pipeline = pipeline  # type: ignore[method-assign]
        return client


def test_a_lost_pipeline_reply_writes_no_duplicates(
        redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path) -> None:
    source = noise(3.0)
    wav = write_wav(tmp_path / "n.wav", source)
    factory = _LoseReplies(redis_server.url)
    service = run_capture(settings_for(redis_server, wav, CAPTURE_BATCH_FRAMES="7"), factory)

    assert factory.lost == 2
    frames, _ = check_contract(read_stream(redis_client), service.run_id)  # one EOS, at the end
    assert b"".join(f.pcm for f in frames) == source.tobytes()
    assert sample(service, "capture_frames_published_total") == 60
    assert sample(service, "capture_redis_errors_total") == 2


def test_redis_never_reachable_loses_the_backlog_counted_and_exits_1(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "n.wav", noise(1.0))
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens
    settings = CaptureSettings.from_env({
        "REDIS_URL": url, "DEVICE_ID": "test-dev", "METRICS_PORT": "0", "CAPTURE_FILE": str(wav),
        "CAPTURE_REALTIME": "false", "CAPTURE_FLUSH_TIMEOUT_S": "0.5"})
    clock = SystemClock()
    service = CaptureService(settings, source=build_source(settings, clock),
                             redis_factory=redis_factory_for(url), registry=CollectorRegistry(),
                             clock=clock, stop=threading.Event())
    assert service.run() == 1
    assert sample(service, "capture_frames_total") == 20
    assert sample(service, "capture_frames_dropped_total", reason="shutdown") == 20
    assert sample(service, "capture_frames_published_total") == 0
    assert sample(service, "capture_redis_up") == 0
