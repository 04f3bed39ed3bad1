"""Fault injection: Redis restarted or stalled (20 s after an utterance, 4 s in the middle of
one), the AssemblyAI connection cut, slowed and blackholed, the service misbehaving (no
Termination, 3008, 3009 storms), a flapping source against the session budget.

Real parts: redis-server, the capture service, the AssemblyAI double, espeak-ng digits; a TCP
proxy (tests/support/tcpproxy.py) between the worker and Redis or the double. Every scenario
prints what was injected, frames and words lost and the recovery time (the closing note's
figures).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from capture.config import CaptureSettings
from capture.contract import Keys
from capture.framing import SystemClock
from capture.service import CaptureService, build_source, redis_factory_for
from tests.double.server import PATH, DoubleServer
from tests.support.feeder import AudioFeeder
from tests.support.redisserver import RedisServer
from tests.support.speech import compose, digits_phrase, speak, write_wav
from tests.support.tcpproxy import TcpProxy
from tests.support.transcribing import RunningWorker, all_digits, report, running_worker, wait_until
from transcriber.records import EndReason

pytestmark = pytest.mark.slow
KEYS = Keys()




def frames_lost(run: RunningWorker, device: str) -> int:
    """Frames the worker never used: seq gaps plus entries skipped for any reason."""
    skipped = sum(s.value for m in run.registry.collect() if m.name == "transcriber_frames_skipped"
                  for s in m.samples if s.name.endswith("_total") and s.labels["device"] == device)
    return int(skipped + run.metric("transcriber_frames_missing_total", device=device))


def edit_distance(a: list[int], b: list[int]) -> int:
    """Words missing, extra or wrong (Levenshtein distance over the digit sequences)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[len(b)]


def words_lost(expected: list[int], heard: list[int]) -> int:
    return edit_distance(expected, heard)


@contextmanager
def feeding_in_background(feeder: AudioFeeder, audio: np.ndarray) -> Iterator[None]:
    """Feed at real time on a thread; stopped (and joined) however the test ends."""
    done = threading.Event()
    thread = threading.Thread(target=lambda: feeder.feed(audio, stop=done),
                              name=f"feed-{feeder.device}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(5)


def skipped_by_reason(run: RunningWorker, device: str) -> dict[str, int]:
    return {s.labels["reason"]: int(s.value) for m in run.registry.collect()
            if m.name == "transcriber_frames_skipped" for s in m.samples
            if s.name.endswith("_total") and s.labels["device"] == device and s.value}


# --- Redis ---------------------------------------------------------------------------------------



def test_redis_restarted_mid_speech(durable_redis: RedisServer, double: DoubleServer,
                                    tmp_path: Path) -> None:
    """Redis crashes (SIGKILL) in the middle of an utterance and is back 1 s later, with its
    append-only file: the capture service buffers, the worker reconnects, nothing is lost."""
    digits = [9, 1, 8, 2, 7, 3, 6, 4]
    wav = write_wav(tmp_path / "speech.wav", compose(0.5, digits_phrase(digits), 3.0))
    settings = CaptureSettings.from_env({"REDIS_URL": durable_redis.url, "DEVICE_ID": "cellar",
                                         "METRICS_PORT": "0", "CAPTURE_FILE": str(wav)})
    capture_registry = CollectorRegistry()
    clock = SystemClock()
    capture = CaptureService(settings, source=build_source(settings, clock),
                             redis_factory=redis_factory_for(durable_redis.url),
                             registry=capture_registry, clock=clock, stop=threading.Event())
    with running_worker(durable_redis.url, double, {"INACTIVITY_TIMEOUT_S": "3"}) as run:
        capturing = threading.Thread(target=capture.run, name="capture", daemon=True)
        capturing.start()
        session = double.wait_for_session(0, timeout=10)
        assert wait_until(lambda: len(double.record(session.session_id or "").audio) > 32000, 10)
        durable_redis.kill()
        time.sleep(1.0)
        durable_redis.start()
        restarted = time.monotonic()
        assert wait_until(lambda: all_digits(run.turns()) == digits, 20), run.turns()
        recovered_s = time.monotonic() - restarted
        capturing.join(15)
        assert wait_until(lambda: len(run.sessions()) >= 1, 10)
        heard = all_digits(run.turns())
        assert heard == digits
        dropped = sum(s.value for m in capture_registry.collect()
                      if m.name == "capture_frames_dropped" for s in m.samples
                      if s.name.endswith("_total"))
        assert dropped == 0 and frames_lost(run, "cellar") == 0
        report("redis restart", injected="SIGKILL of redis-server mid-utterance, back after 1 s "
               "(AOF)", frames_lost=int(dropped) + frames_lost(run, "cellar"),
               words_lost=words_lost(digits, heard),
               all_words_published_after_restart_s=round(recovered_s, 2),
               sessions=len(run.sessions()))


def test_redis_stalled_for_20_s(redis_server: RedisServer, redis_client: redis.Redis,
                                double: DoubleServer) -> None:
    """Redis stops answering the worker for 20 s (a hung server or a partition: connections
    stay open, requests get no reply) just as an utterance ends; another is spoken meanwhile
    (capture reaches Redis by another path). The open session still ends on time, its turn
    waits, and both utterances come out once the stall ends."""
    first, second = [2, 6, 0, 5, 8], [7, 1, 4, 9]
    feeder = AudioFeeder(redis_client, "annex")
    feeder.heartbeat()
    with TcpProxy("127.0.0.1", redis_server.port) as proxy, \
            running_worker(proxy.url, double, {"INACTIVITY_TIMEOUT_S": "1.5",
                                               "TRANSCRIBER_LEASE_TTL_S": "5"}) as run:
        run.client = redis_client  # the test reads Redis directly, not through the proxy
        assert wait_until(lambda: run.worker.devices() == ["annex"], 5)
        spoken = compose(digits_phrase(first))
        audio = compose(0.5, spoken, 6.0, digits_phrase(second), 30.0)
        with feeding_in_background(feeder, audio):
            session = double.wait_for_session(0, timeout=10)
            # all of it (after up to 0.5 s of pre-roll) and 0.3 s of the silence after it
            whole = 2 * (len(spoken) + 16000 * (0.5 + 0.3))
            assert wait_until(lambda: len(double.record(session.session_id or "").audio)
                              >= whole, 10)
            proxy.stall()
            stalled_at = time.monotonic()
            # The session lifecycle does not wait for Redis: the device ends the session by
            # inactivity on time (its own bookkeeping, not just the socket, is done).
            assert wait_until(lambda: run.metric("transcriber_sessions_ended_total",
                                                 device="annex", reason="inactivity") == 1, 10)
            closed_after = time.monotonic() - stalled_at
            assert closed_after < 1.5 + 2.0, closed_after
            assert run.metric("transcriber_session_open", device="annex") == 0
            assert run.turns() == []  # nothing could be published yet
            # ...and the device's timer keeps running (no Redis call blocks its thread)
            time.sleep(max(0.0, 6.0 - (time.monotonic() - stalled_at)))
            before = run.metric("transcriber_silence_seconds", device="annex")
            time.sleep(3.0)
            ticked = run.metric("transcriber_silence_seconds", device="annex") - before
            assert ticked > 2.5, ticked
            time.sleep(max(0.0, 20.0 - (time.monotonic() - stalled_at)))
            proxy.resume()
            resumed = time.monotonic()
            assert wait_until(lambda: all_digits(run.turns())[:len(first)] == first, 15), \
                [t.text for t in run.turns()]
            first_out_s = time.monotonic() - resumed
            assert wait_until(lambda: all_digits(run.turns()) == first + second, 20), run.turns()
            second_out_s = time.monotonic() - resumed
            assert wait_until(lambda: len(run.sessions()) == 2, 15)
            assert [s.reason for s in run.sessions()] == [EndReason.INACTIVITY] * 2
            heard = all_digits(run.turns())
            assert heard == first + second
            assert frames_lost(run, "annex") == 0, skipped_by_reason(run, "annex")
            assert run.worker.health()[0]
            report("redis stall", injected="20 s proxy stall between worker and Redis, right after "
                   "an utterance; a second one spoken during it",
                   session_closed_during_stall_after_s=round(closed_after, 2),
                   frames_lost=frames_lost(run, "annex"),
                   words_lost=words_lost(first + second, heard),
                   first_turn_published_after_stall_s=round(first_out_s, 2),
                   second_utterance_published_after_stall_s=round(second_out_s, 2))


def test_redis_stalled_mid_utterance(redis_server: RedisServer, redis_client: redis.Redis,
                                     double: DoubleServer) -> None:
    """A 4 s stall in the middle of an utterance: the session starves (no frames) and ends by
    inactivity; when the frames come back, the rest of the utterance opens a session of its
    own although the detector never heard a new onset. At most the word cut in two is lost."""
    digits = [2, 6, 0, 5, 8, 3, 9, 1]
    feeder = AudioFeeder(redis_client, "annex")
    feeder.heartbeat()
    with TcpProxy("127.0.0.1", redis_server.port) as proxy, \
            running_worker(proxy.url, double, {"INACTIVITY_TIMEOUT_S": "1.5"}) as run:
        run.client = redis_client
        assert wait_until(lambda: run.worker.devices() == ["annex"], 5)
        with feeding_in_background(feeder, compose(0.5, digits_phrase(digits), 8.0)):
            session = double.wait_for_session(0, timeout=10)
            assert wait_until(lambda: len(double.record(session.session_id or "").audio)
                              > 32000 * 1.5, 10)
            proxy.stall()
            time.sleep(4.0)
            proxy.resume()
            resumed = time.monotonic()
            assert wait_until(lambda: len(run.sessions()) == 2, 15)
            recovered_s = time.monotonic() - resumed
            heard = all_digits(run.turns())
            assert edit_distance(heard, digits) <= 1, heard  # the word cut in two, at most
            assert frames_lost(run, "annex") == 0
            report("redis stall mid-utterance", injected="4 s proxy stall mid-utterance "
                   "(longer than the 1.5 s inactivity timeout)", frames_lost=0,
                   words_lost=edit_distance(heard, digits),
                   texts=[t.text for t in run.turns()],
                   rest_published_after_stall_s=round(recovered_s, 2))


# --- the AssemblyAI connection -------------------------------------------------------------------

def test_assemblyai_connection_cut_at_random_points(redis_server: RedisServer,
                                                    double: DoubleServer) -> None:
    """Three resets (RST) of the AssemblyAI connection at random points of one long utterance:
    each time the worker reconnects and resends the audio since the last final turn."""
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    digits = [rng.randrange(10) for _ in range(14)]
    with TcpProxy("127.0.0.1", double.port) as proxy, \
            running_worker(redis_server.url, double,
                           {"ASSEMBLYAI_URL": proxy.ws_url(PATH)}) as run:
        feeder = AudioFeeder(run.client, "forum")
        feeder.heartbeat()
        assert wait_until(lambda: run.worker.devices() == ["forum"], 5)
        spoken = compose(digits_phrase(digits))
        feeding = feeder.feed_in_thread(compose(0.5, spoken, 2.5))
        double.wait_for_session(0, timeout=10)
        cut_times = []
        began = time.monotonic()
        for _ in range(3):
            time.sleep(rng.uniform(1.0, 2.2))
            assert wait_until(lambda: proxy.open_connections > 0, 5)
            assert proxy.cut() >= 1
            cut_times.append(round(time.monotonic() - began, 2))
        last_cut = time.monotonic()
        assert wait_until(lambda: all_digits(run.turns()) == digits, 25), \
            (seed, cut_times, run.turns())
        recovered_s = time.monotonic() - last_cut
        feeding.join(15)
        # every session that began is on record, the last one ended too
        assert wait_until(lambda: len(run.sessions()) == len(double.sessions())
                          and not run.metric("transcriber_session_open", device="forum"), 10)
        assert run.sessions()[-1].reason in (EndReason.END_OF_STREAM, EndReason.INACTIVITY)
        heard = all_digits(run.turns())
        assert heard == digits, (seed, cut_times)
        assert run.metric("transcriber_errors_total", device="forum", code="network") == 3
        assert frames_lost(run, "forum") == 0
        report("AssemblyAI cuts", injected=f"3 RSTs at {cut_times} s into the utterance "
               f"(seed {seed})", frames_lost=frames_lost(run, "forum"),
               words_lost=words_lost(digits, heard),
               all_words_published_after_last_cut_s=round(recovered_s, 2),
               sessions=len(double.sessions()), utterance_s=round(len(spoken) / 16000, 2))


def test_assemblyai_path_slow_then_blackholed(redis_server: RedisServer,
                                              double: DoubleServer) -> None:
    """A slow link (150 ms each way) that then drops everything for 5 s, connections left
    half-open: the bounded waits (Termination, Begin) end them, and once the path is back the
    audio since the last final turn goes out again."""
    first, second = [4, 1, 5], [9, 2, 6, 5, 3]
    env = {"INACTIVITY_TIMEOUT_S": "1.5", "TRANSCRIBER_TERMINATE_TIMEOUT_S": "1.5",
           "TRANSCRIBER_CONNECT_TIMEOUT_S": "2"}
    with TcpProxy("127.0.0.1", double.port) as proxy, \
            running_worker(redis_server.url, double,
                           {**env, "ASSEMBLYAI_URL": proxy.ws_url(PATH)}) as run:
        proxy.delay(0.15)
        feeder = AudioFeeder(run.client, "garage")
        feeder.heartbeat()
        assert wait_until(lambda: run.worker.devices() == ["garage"], 5)
        spoken = compose(digits_phrase(second))
        feeding = feeder.feed_in_thread(compose(0.5, digits_phrase(first), 0.8, spoken, 8.0))
        session = double.wait_for_session(0, timeout=10)
        assert wait_until(lambda: all_digits(run.turns()) == first, 10)  # the slow link works
        assert wait_until(lambda: len(double.record(session.session_id or "").audio)
                          > 2 * 16000 * 2.5, 10)  # into the second phrase
        proxy.blackhole()
        time.sleep(5.0)
        proxy.resume()
        resumed = time.monotonic()
        assert wait_until(lambda: all_digits(run.turns()) == first + second, 20), run.turns()
        recovered_s = time.monotonic() - resumed
        feeding.join(15)
        heard = all_digits(run.turns())
        assert heard == first + second
        assert frames_lost(run, "garage") == 0
        report("AssemblyAI blackhole", injected="150 ms latency each way, then 5 s of blackhole "
               "mid-utterance", frames_lost=frames_lost(run, "garage"),
               words_lost=words_lost(first + second, heard),
               all_words_published_after_path_back_s=round(recovered_s, 2),
               connections=len(double.records()), dropped_bytes=proxy.stats.bytes_dropped)


def test_termination_never_comes(redis_server: RedisServer, double: DoubleServer) -> None:
    """The service ignores Terminate: the wait is bounded, the session record is written all
    the same, and the next session works."""
    first, second = [3, 3, 9, 1], [6, 0, 7]
    double.set_ignore_terminate(True)
    env = {"INACTIVITY_TIMEOUT_S": "1.5", "TRANSCRIBER_TERMINATE_TIMEOUT_S": "1"}
    with running_worker(redis_server.url, double, env) as run:
        feeder = AudioFeeder(run.client, "porch")
        feeder.heartbeat()
        assert wait_until(lambda: run.worker.devices() == ["porch"], 5)
        feeder.feed(compose(0.5, digits_phrase(first), 3.5))
        ignored = double.wait_for_session(0, closed=True, timeout=10)
        assert ignored.terminate_at is not None and ignored.closed_at is not None
        waited_s = ignored.closed_at - ignored.terminate_at
        assert 0.9 <= waited_s < 1.6, waited_s
        assert "Termination" not in ignored.sent_types()
        assert wait_until(lambda: len(run.sessions()) == 1, 5)
        record = run.sessions()[0]
        assert record.reason is EndReason.INACTIVITY and record.billed_s > 0
        double.set_ignore_terminate(False)
        feeder.feed(compose(0.5, digits_phrase(second), 1.0))
        feeder.end()
        assert wait_until(lambda: len(run.sessions()) >= 2, 10)
        heard = all_digits(run.turns())
        assert heard == first + second
        last = double.sessions()[-1]
        assert "Termination" in last.sent_types()
        # At most one extra connection: the unanswered session's unconfirmed tail, if it held
        # speech, is sent again (the words are not lost, and none came out twice above).
        assert len(double.records()) <= 3, len(double.records())
        report("no Termination", injected="Terminate ignored by the service",
               waited_for_termination_s=round(waited_s, 2), frames_lost=frames_lost(run, "porch"),
               words_lost=words_lost(first + second, heard),
               session_record_written=record.reason.value, connections=len(double.records()))


def test_session_expiry_under_continuous_speech(redis_server: RedisServer,
                                                double: DoubleServer) -> None:
    """Error 3008 (maximum session duration) twice while someone keeps talking: a new session
    opens at once and resends what the old one had not finished; no word lost or doubled."""
    phrases = [[4, 0, 5], [6, 1, 9], [2, 8, 3], [7, 7, 1], [5, 9, 2]]
    parts: list[float | str] = [0.3]
    for phrase in phrases:
        parts += [digits_phrase(phrase), 0.25]  # pauses shorter than the detector's hangover
    digits = [d for p in phrases for d in p]
    rng = random.Random()
    with running_worker(redis_server.url, double, {"INACTIVITY_TIMEOUT_S": "1.5"}) as run:
        feeder = AudioFeeder(run.client, "hall")
        feeder.heartbeat()
        assert wait_until(lambda: run.worker.devices() == ["hall"], 5)
        feeding = feeder.feed_in_thread(compose(*parts, 1.0))
        expired_at = []
        for index in range(2):
            session = double.wait_for_session(index, timeout=10)
            wanted = 32000 * rng.uniform(1.5, 3.0)
            assert wait_until(lambda s=session, n=wanted: len(double.record(s.session_id or "")
                                                            .audio) >= n, 15)
            double.expire(session.session_id)
            expired_at.append(time.monotonic())
        assert wait_until(lambda: all_digits(run.turns()) == digits, 25), run.turns()
        recovered_s = time.monotonic() - expired_at[-1]
        feeding.join(15)
        assert wait_until(lambda: len(run.sessions()) == 3, 10)
        reasons = [s.reason for s in run.sessions()]
        assert reasons[:2] == [EndReason.MAX_DURATION] * 2, reasons
        assert reasons[2] in (EndReason.END_OF_STREAM, EndReason.INACTIVITY), reasons
        heard = all_digits(run.turns())
        assert heard == digits
        reopen_gaps = [round((b.begin_at or 0) - (a.closed_at or 0), 2)
                       for a, b in pairwise(double.sessions())]
        report("3008 expiry", injected="2 × Error 3008 mid-speech", frames_lost=frames_lost(
            run, "hall"), words_lost=words_lost(digits, heard), reopened_after_s=reopen_gaps,
            all_words_published_after_last_expiry_s=round(recovered_s, 2))


def test_a_storm_of_3009_refusals_backs_off_then_transcribes(redis_server: RedisServer,
                                                            double: DoubleServer) -> None:
    digits = [8, 5, 3, 0, 6]
    double.reject_next(5)
    with running_worker(redis_server.url, double) as run:
        feeder = AudioFeeder(run.client, "dock")
        feeder.heartbeat()
        assert wait_until(lambda: run.worker.devices() == ["dock"], 5)
        feeder.feed(compose(0.5, digits_phrase(digits), 1.0))
        feeder.end()
        assert wait_until(lambda: all_digits(run.turns()) == digits, 25), run.turns()
        records = double.records()
        assert len(records) == 6, len(records)  # five refusals, then the session: no hot loop
        assert [r.close_code for r in records[:5]] == [3009] * 5
        gaps = [round(b.connected_at - a.connected_at, 2) for a, b in pairwise(records)]
        # Exponential backoff from 0.2 s with jitter in [c/2, c]: at least 0.1, 0.2, 0.4, 0.8
        assert all(g >= 0.1 * 2 ** i * 0.9 for i, g in enumerate(gaps[:4])), gaps
        recovered_s = (records[-1].begin_at or 0) - records[0].connected_at
        assert run.metric("transcriber_errors_total", device="dock", code="3009") == 5
        heard = all_digits(run.turns())
        report("3009 storm", injected="5 × 3009 refusals in a row", attempt_gaps_s=gaps,
               frames_lost=frames_lost(run, "dock"), words_lost=words_lost(digits, heard),
               session_open_after_first_refusal_s=round(recovered_s, 2))


# --- the new-session budget ----------------------------------------------------------------------

def flapping_noise(seconds: float, seed: int) -> np.ndarray:
    """Bursts of speech-like noise about once a second: 0.35 s of reversed speech, quiet enough
    that the service hears no words (so no transcript holds a session open) while the local
    detector takes it for speech."""
    rng = np.random.default_rng(seed)
    babble = (speak("seven two nine four one eight")[::-1] * 0.03).astype("<i2")
    out = np.zeros(int(seconds * 16000), dtype="<i2")
    at = 0.2
    while at + 0.35 < seconds:
        start = int(rng.integers(0, len(babble) - 5600))
        burst = babble[start:start + 5600]
        i = int(at * 16000)
        out[i:i + len(burst)] = burst
        at += float(rng.uniform(1.0, 1.3))
    return out


def test_a_flapping_source_cannot_exceed_the_session_budget(redis_server: RedisServer,
                                                            redis_client: redis.Redis,
                                                            double: DoubleServer) -> None:
    """Two devices burst noise every ~1 s for 30 s, one on each of two workers sharing Redis,
    with TRANSCRIBER_SESSIONS_PER_MINUTE=3: at most 3 sessions start in the window."""
    env = {"TRANSCRIBER_SESSIONS_PER_MINUTE": "3", "INACTIVITY_TIMEOUT_S": "0.5"}
    devices = ["flap1", "flap2"]
    feeders = [AudioFeeder(redis_client, d) for d in devices]
    for feeder in feeders:
        feeder.heartbeat()
    with running_worker(redis_server.url, double, {**env, "TRANSCRIBER_WORKER_ID": "a"}) as a, \
            running_worker(redis_server.url, double, {**env, "TRANSCRIBER_WORKER_ID": "b"}) as b:
        # one device on each worker (the first hands one to the second)
        assert wait_until(lambda: len(a.worker.devices()) == len(b.worker.devices()) == 1, 8)
        began = time.monotonic()
        threads = [f.feed_in_thread(flapping_noise(30.0, seed=i), end=False)
                   for i, f in enumerate(feeders)]
        for thread in threads:
            thread.join(40)
        elapsed = time.monotonic() - began

        def total(name: str) -> float:
            return sum(r.metric(name, device=d) for r in (a, b) for d in devices)

        started = total("transcriber_sessions_started_total")
        denied = total("transcriber_session_budget_denied_total")
        speech = total("transcriber_speech_seconds_total")
        attempts = len(double.records())
        assert speech > 5, speech  # the detector did hear the bursts as speech
        assert started <= 3, started
        assert attempts <= 3, attempts  # denied opens never even reach the service
        assert denied >= 1
        assert denied < 60, denied  # a denied device waits for the window, not in a hot loop
        report("flapping source", injected=f"noise bursts every ~1 s for {elapsed:.0f} s on 2 "
               "devices, 2 workers, 3 sessions/min", sessions_started=int(started),
               connection_attempts=attempts, budget_denials=int(denied),
               detector_speech_s=round(speech, 1),
               frames_lost=sum(frames_lost(r, d) for r in (a, b) for d in devices
                               if d in r.worker.devices()))
