"""``python -m bench.worker_proc OUT.json``: the transcriber, with every audio send timestamped.

Built exactly as ``python -m transcriber`` builds it (settings from the environment, a real
Redis client, the real ``Worker``), except for the injected ``open_session``: it returns a
:class:`TimedSession`, a ``StreamingSession`` whose ``send_audio`` notes the wall time right
after the bytes were written to the websocket, with the CRC-32 of each 50 ms frame in the
message (the worker sends whole frames, concatenated in order). Nothing else changes.

Prints ``ready`` once the worker runs; on SIGTERM stops it (sessions terminated properly) and
writes OUT.json: per session the device and its sends, plus the worker's metrics summed over
devices. ``BENCH_RECORD=0`` turns the recording off (memory benchmark). SIGUSR1 writes
OUT.threads.json (OS thread id → thread name), for per-thread CPU accounting.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from capture.common.logs import setup_logging
from capture.common.redisconn import connect
from capture.common.runtime import install_stop_signals
from capture.contract import FRAME_BYTES
from transcriber.aai.client import StreamingSession
from transcriber.aai.params import StreamingParams
from transcriber.config import TranscriberSettings
from transcriber.metrics import TranscriberMetrics
from transcriber.worker import Worker

log = logging.getLogger("bench.worker")


@dataclass
class SendLog:
    """The audio messages of one session: (wall time after the write, CRC-32 per frame)."""

    device: str
    sends: list[tuple[float, list[int]]] = field(default_factory=list)


class TimedSession(StreamingSession):
    def __init__(self, *args: Any, send_log: SendLog | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._send_log = send_log

    def send_audio(self, pcm: bytes) -> None:
        super().send_audio(pcm)
        if self._send_log is None:
            return
        written = time.time()
        view = memoryview(pcm)
        self._send_log.sends.append(
            (written, [zlib.crc32(view[i:i + FRAME_BYTES]) for i in range(0, len(pcm),
                                                                           FRAME_BYTES)]))


class ReadPauseWorker(Worker):
    """What-if only, never the headline numbers (``BENCH_WHATIF_READ_PAUSE_S``): pause after
    each read of the device streams. The product's reader issues the next ``XREADGROUP`` over
    every owned stream as soon as the previous one returns, so with devices publishing at
    different moments each call returns about one frame and costs O(devices); a pause lets
    each call collect that long of audio from every device."""

    read_pause_s = float(os.environ.get("BENCH_WHATIF_READ_PAUSE_S", "0"))

    def _read(self) -> None:
        super()._read()
        self._stop_io.wait(self.read_pause_s)


def metrics_summary(registry: CollectorRegistry) -> dict[str, float]:
    """Every sample summed over devices, keyed by name and the other labels."""
    out: dict[str, float] = defaultdict(float)
    for family in registry.collect():
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())
                              if k != "device")
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] += sample.value
    return dict(out)


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    record = os.environ.get("BENCH_RECORD", "1") != "0"
    settings = TranscriberSettings.from_env(os.environ)
    setup_logging(settings.log_level, secrets=[settings.api_key, settings.redis_url])
    params = StreamingParams(speech_model=settings.speech_model,
                             format_turns=settings.format_turns,
                             keyterms_prompt=settings.keyterms)
    logs: list[SendLog] = []

    def open_session() -> StreamingSession:
        send_log = None
        if record:
            # Called on the device's own thread, which is named after the device.
            send_log = SendLog(threading.current_thread().name.removeprefix("device-"))
            logs.append(send_log)
        return TimedSession(settings.aai_url, settings.api_key, params, send_log=send_log)

    registry = CollectorRegistry()
    worker_class = ReadPauseWorker if "BENCH_WHATIF_READ_PAUSE_S" in os.environ else Worker
    worker = worker_class(settings, client=connect(settings.redis_url),
                    metrics=TranscriberMetrics.create(registry), open_session=open_session)
    stop = threading.Event()
    install_stop_signals(stop)

    def dump_threads(signum: int, frame: object) -> None:
        # For per-thread CPU accounting from /proc/<pid>/task: OS thread id -> thread name.
        names = {t.native_id: t.name for t in threading.enumerate()}
        out.with_suffix(".threads.json").write_text(json.dumps(names))

    signal.signal(signal.SIGUSR1, dump_threads)
    worker.start()
    print("ready", flush=True)
    while not stop.wait(1.0):
        pass
    stopping = time.time()
    worker.stop()
    out.write_text(json.dumps({
        "stop_s": round(time.time() - stopping, 3),
        "sessions": [{"device": s.device, "sends": s.sends} for s in logs],
        "metrics": metrics_summary(registry),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
