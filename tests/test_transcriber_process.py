"""``python -m transcriber`` as a process: configuration errors, SIGTERM, health."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.double.server import DoubleServer
from tests.support.feeder import AudioFeeder
from tests.support.redisserver import RedisServer, free_port
from tests.support.speech import compose, digits_phrase
from tests.support.transcribing import all_digits, wait_until
from transcriber.records import EndReason, SessionRecord, TurnRecord


def transcriber_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASSEMBLYAI", "TRANSCRIBER"))}
    env.update(extra)
    return env


def run_transcriber(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "transcriber", *args], env=env,
                          capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "error: ASSEMBLYAI_API_KEY: not set"),
    ({"ASSEMBLYAI_API_KEY": "k", "REDIS_URL": "mysql://x"}, "error: REDIS_URL:"),
    ({"ASSEMBLYAI_API_KEY": "k", "ASSEMBLYAI_URL": "https://x/v3/ws"}, "error: ASSEMBLYAI_URL:"),
    ({"ASSEMBLYAI_API_KEY": "k", "INACTIVITY_TIMEOUT_S": "-1"}, "error: INACTIVITY_TIMEOUT_S:"),
    ({"ASSEMBLYAI_API_KEY": "k", "LOG_LEVEL": "LOUD"}, "error: LOG_LEVEL:"),
])
def test_bad_configuration_is_one_line_and_exit_2(env: dict[str, str], expected: str) -> None:
    result = run_transcriber(env=transcriber_env(**env))
    assert result.returncode == 2
    assert result.stderr.startswith(expected), result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigterm_mid_utterance_terminates_publishes_and_exits_fast(
        redis_server: RedisServer, double: DoubleServer) -> None:
    port = free_port()
    env = transcriber_env(REDIS_URL=redis_server.url, ASSEMBLYAI_API_KEY="test-key",
                          ASSEMBLYAI_URL=double.url, METRICS_PORT=str(port), LOG_LEVEL="INFO")
    proc = subprocess.Popen([sys.executable, "-m", "transcriber"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = redis_server.client()
        feeder = AudioFeeder(client, "studio")
        feeder.heartbeat()
        health = [sys.executable, "-m", "transcriber", "--healthcheck"]
        assert wait_until(lambda: subprocess.run(health, env=env, check=False,
                                                 capture_output=True).returncode == 0, 15)
        digits = [6, 2, 8, 4, 1, 9, 5, 3]
        feeding = feeder.feed_in_thread(compose(0.5, digits_phrase(digits), 3.0), end=False)
        session = double.wait_for_session(0, timeout=15)
        # mid-utterance: ~1.5 s of audio in, the phrase is ~2.5 s long
        assert wait_until(lambda: len(double.record(session.session_id or "").audio) > 48_000,
                          10)
        sent_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=12)
        elapsed = time.monotonic() - sent_at
        feeding.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert elapsed < 10, elapsed
    record = double.record(session.session_id or "")
    assert "Terminate" in record.received
    turns = [TurnRecord.from_fields(f) for _, f in client.xrange("edgescribe:turns")]
    sessions = [SessionRecord.from_fields(f) for _, f in client.xrange("edgescribe:sessions")]
    assert [s.reason for s in sessions] == [EndReason.SHUTDOWN]
    heard = all_digits(turns)
    assert heard and heard == digits[:len(heard)], heard  # the last final turn, a prefix
    assert "Traceback" not in output
    print(f"\n[sigterm] exited in {elapsed:.2f} s; published digits {heard}")

    # The audio not yet sent stayed unacknowledged: a new process resumes it, nothing twice.
    feeder.end()
    restarted = subprocess.Popen([sys.executable, "-m", "transcriber"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def resumed() -> list[int]:
            return all_digits([TurnRecord.from_fields(f)
                               for _, f in client.xrange("edgescribe:turns")])
        assert wait_until(lambda: resumed() == digits, 20), resumed()
        assert wait_until(lambda: client.xlen("edgescribe:sessions") == 2, 10)
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.communicate(timeout=12)
