"""The two references for the bus latency: Redis alone, and no bus at all.

- ``redis_floor``: the feeder process publishes N devices' frames (same schedule as the real
  run), and this process reads every stream with one ``XREAD BLOCK`` loop, like the
  transcriber's reader but with nothing behind it: publish → XADD → XREAD returned.
- ``queue_floor``: the design without the bus: a producer thread hands each frame, when it is
  complete, to a consumer thread through a ``queue.Queue``.

Both time from the moment a frame is complete (ts + 50 ms), the moment capture may publish it.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import redis

from bench.stack import Stack
from capture.contract import Keys

IDLE_SLEEP_S = 0.005


def redis_floor(stack: Stack, devices: int, seconds: float) -> list[float]:
    assert stack.redis is not None
    namespace = f"floor{devices}:"
    feeder = stack.feeder(devices=devices, seconds=seconds, start=time.time() + 2.0,
                          lead=(0.0, 0.0), prefix="floor", namespace=namespace, eos=False)
    keys = Keys(namespace)
    streams: dict[str, str] = {keys.audio(d.name): "0-0" for d in feeder.plan.devices}
    client = redis.Redis.from_url(stack.redis.url, socket_timeout=10)
    end = feeder.plan.start + seconds + 1.0
    delays: list[float] = []
    while time.time() < end:
        reply: Any = client.xread(streams, count=1000, block=500)  # type: ignore[arg-type]
        got = time.time()
        for key, entries in reply or []:
            for _, fields in entries:
                delays.append(got - (int(fields[b"ts"]) / 1e6 + 0.05))
            streams[key.decode()] = entries[-1][0].decode()
    feeder.wait()
    client.close()
    return delays


def queue_floor(devices: int, seconds: float) -> list[float]:
    handoff: queue.Queue[float | None] = queue.Queue()
    delays: list[float] = []

    def consume() -> None:
        while (due := handoff.get()) is not None:
            delays.append(time.time() - due)

    consumer = threading.Thread(target=consume, name="consumer")
    consumer.start()
    start = time.time() + 0.5
    total = round(seconds / 0.05) * devices
    i = 0
    while i < total:
        now = time.time()
        n, d = divmod(i, devices)
        due = start + d * 0.05 / devices + (n + 1) * 0.05
        if due <= now:
            handoff.put(due)
            i += 1
        else:
            time.sleep(min(due - now, IDLE_SLEEP_S))
    handoff.put(None)
    consumer.join()
    return delays
