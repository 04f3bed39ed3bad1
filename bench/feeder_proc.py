"""``python -m bench.feeder_proc``: many devices publishing audio frames at real time, cheaply.

A load generator, not capture: one process for all devices, one pipelined Redis connection,
commands encoded by hand (RESP) so that 1000 devices (20 000 XADD/s) cost a few percent of a
core and leave the CPU to what is measured. The entries are what capture writes: the contract's
own field encoder (``AudioFrame.to_fields``), ``XADD ... MAXLEN ~ 1200`` (60 s retention), and a
registry heartbeat every 2 s. Each frame is published when it is complete (ts + 50 ms), as a
microphone would; how late each went out is reported (``lateness``).

Writes the plan (``--plan``) before the first frame and prints ``ready``; writes its stats
(``--stats``) when done.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from bench.audio import FeedPlan, frames_of, make_plan, speech_loop, whole_frames
from bench.common import stats_ms
from capture.common.runtime import install_stop_signals
from capture.contract import FRAME_BYTES, AudioFrame, DeviceRecord, EndOfStream, Keys

HEARTBEAT_S = 2.0
IDLE_SLEEP_S = 0.005


def command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _bytes(value: str | int | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def fields_args(fields: dict[str, str | int | bytes]) -> list[bytes]:
    out: list[bytes] = []
    for name, value in fields.items():
        out += [name.encode(), _bytes(value)]
    return out


class RawRedis:
    """A write-mostly pipelined connection; replies are drained and errors counted."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.errors = 0
        self._pong = threading.Event()
        self._reader = threading.Thread(target=self._drain, name="drain", daemon=True)
        self._reader.start()

    def send(self, payload: bytes) -> None:
        self._sock.sendall(payload)

    def _drain(self) -> None:
        tail = b""
        while True:
            try:
                chunk = self._sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            data = tail + chunk
            self.errors += data.count(b"\r\n-") - tail.count(b"\r\n-")
            if b"+PONG\r\n" in data:
                self._pong.set()
            tail = data[-8:]

    def close(self, timeout: float = 10.0) -> None:
        """Wait until Redis has answered everything sent, then close."""
        self.send(command(b"PING"))
        self._pong.wait(timeout)
        self._sock.close()


class Feeder:
    def __init__(self, plan: FeedPlan, loop: list[bytes], redis: RawRedis, *, keys: Keys,
                 maxlen: int, stop: threading.Event) -> None:
        self.plan = plan
        self.loop = loop
        self.redis = redis
        self.keys = keys
        self.maxlen = str(maxlen).encode()
        self.stop = stop
        self.runs = {d.name: f"{i:08x}" for i, d in enumerate(plan.devices)}
        self.lateness = np.zeros(plan.frames * len(plan.devices), dtype=np.float32)
        self.published = 0

    def heartbeat(self) -> None:
        now = time.time()
        payload = b"".join(
            command(b"HSET", self.keys.devices.encode(), d.name.encode(),
                    DeviceRecord(run=self.runs[d.name], rate=16000, channels=1,
                                 started=self.plan.start, seen=now,
                                 source="bench").to_json().encode())
            for d in self.plan.devices)
        self.redis.send(payload)

    def xadd(self, device_index: int, n: int) -> bytes:
        d = self.plan.devices[device_index]
        if n < d.lead:
            pcm = bytes(FRAME_BYTES)
        else:
            pcm = self.loop[(n - d.lead + d.offset) % len(self.loop)]
        frame = AudioFrame(run=self.runs[d.name], seq=n, ts_us=d.t0_us + n * 50_000, pcm=pcm)
        return command(b"XADD", self.keys.audio(d.name).encode(), b"MAXLEN", b"~", self.maxlen,
                       b"*", *fields_args(frame.to_fields()))

    def run(self) -> None:
        devices = len(self.plan.devices)
        total = self.plan.frames * devices
        t0 = [d.t0_us for d in self.plan.devices]
        i = 0
        next_beat = 0.0
        while i < total and not self.stop.is_set():
            now = time.time()
            if now >= next_beat:
                self.heartbeat()
                next_beat = now + HEARTBEAT_S
            batch: list[bytes] = []
            first = i
            while i < total:
                n, d = divmod(i, devices)
                if (t0[d] + (n + 1) * 50_000) / 1e6 > now:
                    break
                batch.append(self.xadd(d, n))
                i += 1
            if batch:
                self.redis.send(b"".join(batch))
                sent = time.time()
                for j in range(first, i):
                    n, d = divmod(j, devices)
                    self.lateness[j] = sent - (t0[d] + (n + 1) * 50_000) / 1e6
                self.published = i
            else:
                n, d = divmod(i, devices)
                wait = (t0[d] + (n + 1) * 50_000) / 1e6 - now
                time.sleep(min(max(wait, 0.0), IDLE_SLEEP_S))

    def end(self) -> None:
        self.redis.send(b"".join(
            command(b"XADD", self.keys.audio(d.name).encode(), b"*",
                    *fields_args(EndOfStream(run=self.runs[d.name], seq=self.plan.frames,
                                             ts_us=d.t0_us + self.plan.frames * 50_000)
                                 .to_fields()))
            for d in self.plan.devices))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.feeder_proc")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--namespace", default="edgescribe:")
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--start", type=float, default=0.0, help="epoch s (default: now + 1 s)")
    p.add_argument("--lead", type=float, nargs=2, default=(0.5, 3.0), metavar=("MIN", "MAX"),
                   help="seconds of silence before a device speaks (uniform)")
    p.add_argument("--prefix", default="bench")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--maxlen", type=int, default=1200)
    p.add_argument("--eos", action="store_true", help="end every stream with end-of-stream")
    p.add_argument("--track", type=Path,
                   help="an int16 .npy recording to speak once instead of the loop "
                        "(--seconds and --lead are then taken from it: no lead)")
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--stats", type=Path, required=True)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    install_stop_signals(stop)
    if args.track is not None:
        loop = frames_of(whole_frames(np.load(args.track)))
        args.seconds, args.lead = len(loop) * 0.05, (0.0, 0.0)
    else:
        loop = frames_of(speech_loop())
    start = args.start or time.time() + 1.0
    plan = make_plan(devices=args.devices, seconds=args.seconds, start=start, loop_frames=loop,
                     lead_s=tuple(args.lead), prefix=args.prefix, seed=args.seed,
                     offsets=args.track is None)
    plan.save(args.plan)
    redis = RawRedis(args.redis_url)
    feeder = Feeder(plan, loop, redis, keys=Keys(args.namespace), maxlen=args.maxlen, stop=stop)
    print("ready", flush=True)
    feeder.run()
    if args.eos and not stop.is_set():
        feeder.end()
    redis.close()
    done = feeder.lateness[:feeder.published]
    args.stats.write_text(json.dumps({"published": feeder.published, "errors": redis.errors,
                                      "lateness_ms": stats_ms(done)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
