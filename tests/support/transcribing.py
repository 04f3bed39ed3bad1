"""A transcriber worker running in-process against a real Redis and the AssemblyAI double."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import redis
from prometheus_client import CollectorRegistry

from capture.common.redisconn import connect
from capture.contract import Keys
from tests.double.server import DoubleServer
from tests.support.speech import DIGIT_WORDS
from transcriber.aai.client import StreamingSession
from transcriber.aai.params import StreamingParams
from transcriber.config import TranscriberSettings
from transcriber.metrics import TranscriberMetrics
from transcriber.records import SessionRecord, TurnRecord
from transcriber.worker import Worker

FAST_ENV = {
    "METRICS_PORT": "0",
    "TRANSCRIBER_RECONNECT_BACKOFF_S": "0.2",
    "TRANSCRIBER_DEVICE_GONE_AFTER_S": "5",
}


@dataclass
class RunningWorker:
    worker: Worker
    settings: TranscriberSettings
    registry: CollectorRegistry
    client: redis.Redis

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def turns(self) -> list[TurnRecord]:
        return [TurnRecord.from_fields(f)
                for _, f in self.client.xrange(Keys(self.settings.namespace).turns)]

    def sessions(self) -> list[SessionRecord]:
        return [SessionRecord.from_fields(f)
                for _, f in self.client.xrange(Keys(self.settings.namespace).sessions)]


@contextmanager
def running_worker(redis_url: str, double: DoubleServer, env: Mapping[str, str] | None = None,
                   api_key: str = "test-key") -> Iterator[RunningWorker]:
    settings = TranscriberSettings.from_env({
        "REDIS_URL": redis_url, "ASSEMBLYAI_API_KEY": api_key, "ASSEMBLYAI_URL": double.url,
        **FAST_ENV, **(env or {})})
    params = StreamingParams(speech_model=settings.speech_model,
                             format_turns=settings.format_turns)

    def open_session() -> StreamingSession:
        return StreamingSession(settings.aai_url, settings.api_key, params)

    registry = CollectorRegistry()
    client = connect(redis_url)
    worker = Worker(settings, client=client, metrics=TranscriberMetrics.create(registry),
                    open_session=open_session)
    worker.start()
    try:
        yield RunningWorker(worker, settings, registry, connect(redis_url))
    finally:
        worker.stop()


def digits_of(text: str) -> list[int]:
    """The spoken digits in a transcript ("Seven three." -> [7, 3])."""
    words = re.findall(r"[a-z]+", text.lower())
    return [DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS]


def all_digits(turns: list[TurnRecord], device: str | None = None) -> list[int]:
    out: list[int] = []
    for turn in sorted((t for t in turns if t.final and (device is None or t.device == device)),
                       key=lambda t: t.start_ts):
        out.extend(digits_of(turn.text))
    return out


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def report(label: str, **figures: object) -> None:
    print(f"\n[{label}] " + "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in figures.items()))
