"""Memory: capture's RSS, the transcriber's RSS per device, Redis memory per device.

    .venv/bin/python -m bench.memory

- **capture**: ``python -m capture --file speech.wav`` (real time, ~25 s of digit phrases),
  VmRSS sampled every 100 ms from /proc/<pid>/status; VmHWM is the peak.
- **transcriber per device**: the transcriber (own process) first with no device, then with
  100 idle devices (digital silence: detector only, no session), then with 100 more devices
  speaking (a session each); RSS (median of samples over 2 s) differences divided by 100.
- **Redis per device**: a device stream holding 60 s of frames (the default retention:
  ``XADD MAXLEN ~ 1200``) written by the real capture (``--no-realtime``, a 90 s WAV), measured
  with ``MEMORY USAGE key SAMPLES 0``; then ``INFO memory`` used_memory before/after 50 such
  streams plus their registry entries, divided by 50; and the streams of the transcriber run
  (with its consumer group and pending entries), idle and speaking.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench.audio import frames_of, speech_loop
from bench.common import (
    REPO,
    loadavg,
    machine,
    machine_line,
    md_table,
    status_kb,
    write_result,
)
from bench.stack import Stack, _base_env
from capture.contract import AudioFrame, DeviceRecord, Keys
from tests.support.speech import write_wav

RETENTION_FRAMES = 1200  # capture's default: 60 s of 50 ms frames
DEVICES = 100
REDIS_DEVICES = 50


def sample_rss(pid: int, seconds: float, every: float = 0.1) -> list[int]:
    out = []
    end = time.time() + seconds
    while time.time() < end:
        try:
            out.append(status_kb(pid, "VmRSS"))
        except (OSError, KeyError):
            break
        time.sleep(every)
    return out


def capture_rss(stack: Stack, wav: Path, url: str) -> dict[str, Any]:
    env = {**_base_env(), "REDIS_URL": url, "DEVICE_ID": "mem-capture", "METRICS_PORT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "capture", "--file", str(wav)], env=env,
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: list[int] = []
    hwm = 0
    while proc.poll() is None:
        try:
            samples.append(status_kb(proc.pid, "VmRSS"))
            hwm = status_kb(proc.pid, "VmHWM")
        except (OSError, KeyError):
            break
        time.sleep(0.1)
    proc.wait(30)
    steady = samples[20:] or samples  # after the first 2 s (imports, first frames)
    return {"rss_median_mb": round(statistics.median(steady) / 1024, 1),
            "rss_max_mb": round(max(samples) / 1024, 1), "hwm_mb": round(hwm / 1024, 1),
            "samples": len(samples), "exit_code": proc.returncode}


def stream_usage(client: redis.Redis, key: str) -> dict[str, int]:
    usage = client.memory_usage(key, samples=0) or 0
    return {"bytes": int(usage), "entries": int(client.xlen(key))}


def redis_per_device(client: redis.Redis, url: str, wav90: Path) -> dict[str, Any]:
    env = {**_base_env(), "REDIS_URL": url, "DEVICE_ID": "mem-redis", "METRICS_PORT": "0"}
    subprocess.run([sys.executable, "-m", "capture", "--file", str(wav90), "--no-realtime"],
                   env=env, cwd=REPO, check=True, capture_output=True, timeout=120)
    keys = Keys()
    real = stream_usage(client, keys.audio("mem-redis"))
    loop = frames_of(speech_loop())
    before = int(client.info("memory")["used_memory"])
    for i in range(REDIS_DEVICES):
        device = f"mem-{i:03d}"
        pipe = client.pipeline(transaction=False)
        for n in range(1500):  # more than 60 s, so trimming has reached its steady state
            frame = AudioFrame(run="0123abcd", seq=n, ts_us=1_700_000_000_000_000 + n * 50_000,
                               pcm=loop[n % len(loop)])
            pipe.xadd(keys.audio(device), frame.to_fields(),  # type: ignore[arg-type]
                      maxlen=RETENTION_FRAMES, approximate=True)
        record = DeviceRecord(run="0123abcd", rate=16000, channels=1, started=time.time(),
                              seen=time.time(), source="bench")
        pipe.hset(keys.devices, device, record.to_json())
        pipe.execute()
    after = int(client.info("memory")["used_memory"])
    return {"capture_stream": real, "per_device_info_delta_bytes": (after - before)
            // REDIS_DEVICES, "devices": REDIS_DEVICES}


def median_rss_mb(pid: int) -> float:
    return round(statistics.median(sample_rss(pid, 2.0)) / 1024, 1)


def transcriber_per_device(stack: Stack) -> dict[str, Any]:
    assert stack.redis is not None
    stack.redis.client().flushall()
    double = stack.double("cheap")
    worker = stack.worker(double.url, {"BENCH_RECORD": "0"})
    time.sleep(3.0)
    base = median_rss_mb(worker.pid)
    start = time.time() + 2.0
    idle = stack.feeder(devices=DEVICES, seconds=50, start=start, lead=(60.0, 60.0),
                        prefix="idle", eos=False)
    time.sleep(max(0.0, start + 14 - time.time()))
    with_idle = median_rss_mb(worker.pid)
    talk = stack.feeder(devices=DEVICES, seconds=32, start=time.time() + 1.5,
                        lead=(0.5, 2.0), prefix="talk", eos=False)
    time.sleep(max(0.0, talk.plan.start + 25 - time.time()))
    with_talk = median_rss_mb(worker.pid)
    threads = status_kb(worker.pid, "Threads")
    client = stack.redis.client()
    keys = Keys()
    idle_stream = stream_usage(client, keys.audio(idle.plan.devices[0].name))
    talk_stream = stream_usage(client, keys.audio(talk.plan.devices[0].name))
    pending = int(client.xpending(keys.audio(talk.plan.devices[0].name),
                                  "transcribers")["pending"])
    talk.wait()
    idle.child.stop()
    worker.stop()
    double.stop()
    return {"base_mb": base, "with_idle_mb": with_idle, "with_idle_and_speaking_mb": with_talk,
            "per_idle_device_kb": round((with_idle - base) * 1024 / DEVICES),
            "per_speaking_device_kb": round((with_talk - with_idle) * 1024 / DEVICES),
            "threads": threads, "idle_stream": idle_stream, "speaking_stream": talk_stream,
            "speaking_stream_pending": pending}


def _per_entry(stream: dict[str, int]) -> str:
    return (f"{stream['bytes'] / 1e6:.2f} MB for {stream['entries']} entries "
            f"({stream['bytes'] / max(stream['entries'], 1):.0f} B per 50 ms frame)")


def table(cap: dict[str, Any], tr: dict[str, Any], rd: dict[str, Any]) -> str:
    rows = [
        ["capture RSS (replaying a WAV at real time)",
         f"{cap['rss_median_mb']:.0f} MB median, {cap['hwm_mb']:.0f} MB peak"],
        ["transcriber RSS, no device", f"{tr['base_mb']:.0f} MB"],
        [f"transcriber RSS per idle device ({DEVICES} idle)", f"{tr['per_idle_device_kb']} kB"],
        [f"transcriber RSS per speaking device (+{DEVICES} speaking)",
         f"{tr['per_speaking_device_kb']} kB"],
        ["Redis: a device stream at the default 60 s retention, written by capture "
         "(MEMORY USAGE)", _per_entry(rd["capture_stream"])],
        [f"Redis per device (INFO used_memory delta, {rd['devices']} devices)",
         f"{rd['per_device_info_delta_bytes'] / 1e6:.2f} MB"],
        ["Redis, with the transcribers' consumer group: an idle device's stream",
         _per_entry(tr["idle_stream"])],
        ["Redis, with the transcribers' consumer group: a speaking device's stream",
         _per_entry(tr["speaking_stream"]) + f", {tr['speaking_stream_pending']} pending"],
    ]
    return md_table(["what", "measured"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    began = time.time()
    load_before = loadavg()
    with Stack() as stack:
        server = stack.start_redis()
        wav = write_wav(stack.path("speech.wav"), speech_loop())
        loop = speech_loop()
        wav90 = write_wav(stack.path("speech90.wav"), np.tile(loop, 90 * 16000 // len(loop) + 1))
        cap = capture_rss(stack, wav, server.url)
        client = server.client()
        client.flushall()
        rd = redis_per_device(client, server.url, wav90)
        tr = transcriber_per_device(stack)
    text = table(cap, tr, rd)
    print(f"\nMemory ({machine_line(machine())}; load before {load_before[0]:.2f})\n")
    print(text)
    path = write_result("memory", {"capture": cap, "transcriber": tr, "redis": rd,
                                   "load_before": load_before, "load_after": loadavg(),
                                   "wall_s": round(time.time() - began, 1), "table": text})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
