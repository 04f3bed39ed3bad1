"""Writes audio into a device's stream the way capture does, for transcriber tests.

Uses the contract's own encoders, so a format change breaks these tests too.
"""

from __future__ import annotations

import secrets
import threading
import time

import numpy as np
import redis

from capture.contract import FRAME_SAMPLES, FRAME_US, AudioFrame, DeviceRecord, EndOfStream, Keys


class AudioFeeder:
    def __init__(self, client: redis.Redis, device: str, keys: Keys | None = None) -> None:
        self.client = client
        self.device = device
        self.keys = keys or Keys()
        self.run = secrets.token_hex(4)
        self.started = time.time()
        self.t0_us = int(self.started * 1_000_000)
        self.seq = 0

    def heartbeat(self) -> None:
        record = DeviceRecord(run=self.run, rate=16000, channels=1, started=self.started,
                              seen=time.time(), source="test")
        self.client.hset(self.keys.devices, self.device, record.to_json())

    def feed(self, samples: np.ndarray, *, speed: float = 1.0,
             stop: threading.Event | None = None) -> None:
        """Publish ``samples`` as 50 ms frames; ``speed`` 1.0 is real time, 0 is unpaced."""
        samples = np.asarray(samples, dtype="<i2")
        pad = (-len(samples)) % FRAME_SAMPLES
        if pad:
            samples = np.concatenate([samples, np.zeros(pad, dtype="<i2")])
        began = time.monotonic()
        if self.seq == 0:  # like capture: ts is anchored to the first sample's time
            self.t0_us = int(time.time() * 1_000_000)
        first_seq = self.seq
        self.heartbeat()
        last_beat = began
        for start in range(0, len(samples), FRAME_SAMPLES):
            if stop is not None and stop.is_set():
                return
            frame = AudioFrame(run=self.run, seq=self.seq, ts_us=self.t0_us + self.seq * FRAME_US,
                               pcm=samples[start:start + FRAME_SAMPLES].tobytes())
            self.client.xadd(self.keys.audio(self.device), frame.to_fields())  # type: ignore[arg-type]
            self.seq += 1
            if speed > 0:
                due = began + (self.seq - first_seq) * FRAME_US / 1e6 / speed
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            if time.monotonic() - last_beat > 1.0:
                self.heartbeat()
                last_beat = time.monotonic()

    def end(self) -> None:
        eos = EndOfStream(run=self.run, seq=self.seq, ts_us=self.t0_us + self.seq * FRAME_US)
        self.client.xadd(self.keys.audio(self.device), eos.to_fields())  # type: ignore[arg-type]

    def feed_in_thread(self, samples: np.ndarray, *, speed: float = 1.0,
                       end: bool = True) -> threading.Thread:
        def work() -> None:
            self.feed(samples, speed=speed)
            if end:
                self.end()

        thread = threading.Thread(name=f"feed-{self.device}", target=work, daemon=True)
        thread.start()
        return thread
