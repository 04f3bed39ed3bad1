"""The consumer example of README.md runs as written, against a real redis-server.

Turns are written with the transcriber's own record format, so the example and the producer
cannot drift apart unnoticed.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.redisserver import RedisServer
from transcriber.records import TurnRecord, WordRecord

README = Path(__file__).resolve().parents[1] / "README.md"
STREAM = "edgescribe:turns"
GROUP = "my-service"  # as in the example


class Consumer:
    """The example as a child process; its stdout lines arrive on a queue."""

    def __init__(self, script: Path, redis_url: str) -> None:
        env = {**os.environ, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
        env.pop("EDGESCRIBE_NAMESPACE", None)
        self.proc = subprocess.Popen([sys.executable, str(script)], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="consumer-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def output(self) -> list[str]:
        lines = []
        while True:
            try:
                lines.append(self.lines.get(timeout=0.2))
            except queue.Empty:
                return lines

    def stop(self) -> str:
        """Stop the process; its stderr (a traceback, if it failed)."""
        self.proc.terminate()
        self.proc.wait(10)
        self._reader.join(5)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        with self.proc.stderr:
            return self.proc.stderr.read()


def turn(session: str, order: int, text: str, *, final: bool = True) -> dict[str, str | int]:
    words = tuple(WordRecord(w, 100 * i, 100 * i + 90, 0.9) for i, w in enumerate(text.split()))
    return TurnRecord(device="kitchen", session=session, turn=order, final=final, text=text,
                      words=words, start_ts=1_700_000_000_000_000, end_ts=1_700_000_001_000_000,
                      eot_confidence=0.8).to_fields()


def wait_until_acknowledged(client: redis.Redis, last_id: bytes) -> None:
    """Every entry up to ``last_id`` delivered to the group and acknowledged."""
    deadline = time.monotonic() + 15
    while True:
        groups = {g["name"]: g for g in client.xinfo_groups(STREAM)} if client.exists(STREAM) \
            else {}
        group = groups.get(GROUP.encode())
        if group and group["last-delivered-id"] == last_id and group["pending"] == 0:
            return
        assert time.monotonic() < deadline, f"consumer stuck: {group}"
        time.sleep(0.05)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert blocks, "no python example in README.md"
    path = tmp_path / "consumer.py"
    path.write_text(blocks[0])
    return path


@pytest.fixture
def consumers(script: Path, redis_server: RedisServer) -> Iterator[list[Consumer]]:
    started: list[Consumer] = []
    try:
        yield started
    finally:
        for consumer in started:
            if consumer.proc.poll() is None:
                consumer.stop()


def test_example_prints_each_final_turn_once_and_resumes_after_restart(
    script: Path, redis_server: RedisServer, redis_client: redis.Redis,
    consumers: list[Consumer],
) -> None:
    # A turn already in the stream before the service first starts: read from history ("0").
    redis_client.xadd(STREAM, turn("s1", 0, "good morning"))
    consumers.append(Consumer(script, redis_server.url))
    redis_client.xadd(STREAM, turn("s1", 1, "open the", final=False))  # a partial: skipped
    redis_client.xadd(STREAM, turn("s1", 1, "open the door"))
    last = redis_client.xadd(STREAM, turn("s1", 1, "open the door"))  # redelivered: same id
    wait_until_acknowledged(redis_client, last)
    assert consumers[0].output() == ["[kitchen] good morning", "[kitchen] open the door"]

    consumers[0].stop()
    last = redis_client.xadd(STREAM, turn("s2", 0, "lights off"))  # while the service is down
    consumers.append(Consumer(script, redis_server.url))
    wait_until_acknowledged(redis_client, last)
    assert consumers[1].output() == ["[kitchen] lights off"]
    assert consumers[1].proc.poll() is None, "the consumer exited"
