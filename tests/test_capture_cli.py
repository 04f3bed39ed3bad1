"""``python -m capture`` as a process: bad input ends in one clear line and status 2; a real run
answers its health check, stops cleanly on SIGTERM and leaves an end-of-stream entry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import redis

from capture.contract import AudioFrame, EndOfStream, Keys, decode_entry
from tests.support.redisserver import RedisServer, free_port
from tests.support.speech import write_wav


def capture_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no sound server reachable, metrics off, Redis nowhere useful."""
    keep = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "SYSTEMROOT")
    env = {k: v for k, v in os.environ.items() if k in keep}
    run_dir = tmp_path / "xdg"
    run_dir.mkdir(exist_ok=True)
    env.update(HOME=str(tmp_path), XDG_RUNTIME_DIR=str(run_dir), METRICS_PORT="0",
               DEVICE_ID="cli-dev", REDIS_URL="redis://127.0.0.1:1/0")
    return {**env, **extra}


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "capture", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture
def wavs(tmp_path: Path) -> dict[str, Path]:
    good = write_wav(tmp_path / "good.wav", np.zeros(1600, dtype="<i2"))
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n")
    float_wav = tmp_path / "float.wav"  # WAVE_FORMAT_IEEE_FLOAT (3), 16 kHz mono, 0 frames
    float_wav.write_bytes(b"RIFF" + (36).to_bytes(4, "little") + b"WAVEfmt "
                          + (16).to_bytes(4, "little")
                          + bytes.fromhex("0300 0100 803e0000 00fa0000 0400 2000")
                          + b"data" + (0).to_bytes(4, "little"))
    truncated = tmp_path / "cut.wav"
    truncated.write_bytes(good.read_bytes()[:30])
    return {"good": good, "text": text, "float": float_wav, "cut": truncated,
            "missing": tmp_path / "nope.wav"}


def test_bad_input_is_one_line_and_status_2(tmp_path: Path, wavs: dict[str, Path]) -> None:
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["--file", str(wavs["missing"])], {}, "error: --file: cannot read "),
        ([], {"CAPTURE_FILE": str(wavs["text"])}, "error: CAPTURE_FILE: "),
        (["--file", str(wavs["text"])], {}, "is not a usable WAV file"),
        (["--file", str(wavs["float"])], {}, "not integer PCM"),
        (["--file", str(wavs["cut"])], {}, "error: --file: "),
        (["--file", str(wavs["good"])], {"DEVICE_ID": "kitchen mic!"},
         "error: DEVICE_ID: 'kitchen mic!' must match"),
        (["--file", str(wavs["good"]), "--device-id", "x" * 65], {}, "error: --device-id: "),
        (["--file", str(wavs["good"])], {"REDIS_URL": "http://localhost:6379"},
         "error: REDIS_URL: "),
        (["--file", str(wavs["good"]), "--redis-url", "redis://:s3cr3t@host:port/0"], {},
         "error: --redis-url: cannot parse"),
        (["--file", str(wavs["good"])], {"METRICS_PORT": "ninety"},
         "error: METRICS_PORT: expected a whole number"),
        (["--file", str(wavs["good"]), "--metrics-port", "70000"], {},
         "error: --metrics-port: must be at most"),
        (["--file", str(wavs["good"])], {"CAPTURE_BUFFER_S": "0"},
         "error: CAPTURE_BUFFER_S: must be at least"),
        (["--file", str(wavs["good"])], {"CAPTURE_RETENTION_S": "1 minute"},
         "error: CAPTURE_RETENTION_S: expected a number"),
        (["--file", str(wavs["good"])], {"CAPTURE_REALTIME": "sometimes"},
         "error: CAPTURE_REALTIME: expected true or false"),
        (["--bogus"], {}, "error: arguments: unrecognized arguments: --bogus"),
        ([], {}, "error: CAPTURE_INPUT_DEVICE: no input devices found"),  # no microphone
        (["--device", "3"], {}, "error: --device: no input devices found"),
        (["--healthcheck"], {"METRICS_PORT": "0"}, "error: METRICS_PORT: is 0"),
    ]
    # All at once: each is a Python start-up, and they do not interfere.
    procs = [start(args, capture_env(tmp_path, **env)) for args, env, _ in cases]
    for (args, env, expected), proc in zip(cases, procs, strict=True):
        out, err = proc.communicate(timeout=30)
        what = f"{args} {env}"
        assert proc.returncode == 2, f"{what}: status {proc.returncode}, stderr {err!r}"
        assert "Traceback" not in err, what
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and expected in lines[0], f"{what}: {err!r}"
        assert "s3cr3t" not in err
        assert out == ""


def test_healthcheck_fails_when_nothing_listens(tmp_path: Path) -> None:
    proc = start(["--healthcheck", "--metrics-port", str(free_port())], capture_env(tmp_path))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "unhealthy" in err and "Traceback" not in err


@pytest.mark.slow
def test_process_serves_health_and_stops_cleanly_on_sigterm(
        redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path) -> None:
    samples = (np.random.default_rng(5).standard_normal(10 * 16_000) * 1000).astype("<i2")
    wav = write_wav(tmp_path / "ten.wav", samples)
    port = free_port()
    env = capture_env(tmp_path, REDIS_URL=redis_server.url, METRICS_PORT=str(port))
    proc = start(["--file", str(wav)], env)  # real time: still running when stopped
    try:
        deadline = time.monotonic() + 10
        while redis_client.xlen(Keys().audio("cli-dev")) < 10:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        check = start(["--healthcheck"], {**env, "METRICS_PORT": str(port)})
        check.communicate(timeout=30)
        assert check.returncode == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            metrics = reply.read().decode()
        assert 'capture_frames_total{device="cli-dev"}' in metrics
        assert 'capture_frames_dropped_total{device="cli-dev",reason="buffer_full"} 0.0' in metrics
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "received SIGTERM" in err and "finished:" in err

    entries = [decode_entry(f) for _id, f in redis_client.xrange(Keys().audio("cli-dev"))]
    *frames, eos = entries
    assert isinstance(eos, EndOfStream)
    assert all(isinstance(f, AudioFrame) for f in frames)
    assert [f.seq for f in frames] == list(range(len(frames))) and eos.seq == len(frames)
    assert 10 <= len(frames) < 200  # stopped before the end of the 10 s file
    pcm = b"".join(f.pcm for f in frames if isinstance(f, AudioFrame))
    assert pcm == samples.tobytes()[:len(pcm)]
