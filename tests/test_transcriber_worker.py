"""The transcriber end to end: real Redis, the AssemblyAI double, espeak-ng digits.

Audio is fed at real time where sessions are involved: the double enforces AssemblyAI's
real-time pacing, and the inactivity timer is what is tested.
"""

from __future__ import annotations

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capture.contract import Keys
from tests.double.server import DoubleServer
from tests.support.feeder import AudioFeeder
from tests.support.redisserver import RedisServer
from tests.support.speech import compose, digits_phrase
from tests.support.transcribing import all_digits, running_worker, wait_until
from transcriber.records import EndReason

pytestmark = pytest.mark.slow


def report(label: str, billed: float, speech: float, recalled: int, spoken: int) -> None:
    print(f"\n[{label}] billed {billed:.2f} s, speech {speech:.2f} s, "
          f"words recalled {recalled}/{spoken}")


def test_preroll_keeps_the_first_word(redis_server: RedisServer, double: DoubleServer) -> None:
    digits = [7, 3, 5, 8, 2]
    with running_worker(redis_server.url, double) as run:
        feeder = AudioFeeder(run.client, "porch")
        feeder.heartbeat()
        assert wait_until(lambda: run.worker.devices() == ["porch"], 5)
        feeder.feed(compose(1.0, digits_phrase(digits), 1.5))
        feeder.end()
        assert wait_until(lambda: len(run.sessions()) == 1, 10)
        turns = run.turns()
        assert all_digits(turns) == digits
        session = run.sessions()[0]
        assert session.reason is EndReason.END_OF_STREAM
        assert [t.id for t in turns] == [f"{session.session}:{t.turn}" for t in turns]
        # capture-time mapping: the first word starts ~1 s into the feed, not at the pre-roll
        first_word_s = (turns[0].start_ts - feeder.t0_us) / 1e6
        assert 0.8 <= first_word_s <= 1.4, first_word_s
        report("pre-roll", session.billed_s, run.metric("transcriber_speech_seconds_total",
                                                        device="porch"),
               len(all_digits(turns)), len(digits))


def test_a_long_pause_ends_the_session_by_inactivity_and_speech_reopens_it(
        redis_server: RedisServer, double: DoubleServer) -> None:
    first, second = [1, 2, 3, 4], [9, 8, 7, 6]
    with running_worker(redis_server.url, double, {"INACTIVITY_TIMEOUT_S": "5"}) as run:
        feeder = AudioFeeder(run.client, "hall")
        feeder.heartbeat()
        assert wait_until(lambda: run.worker.devices() == ["hall"], 5)
        audio = compose(0.5, digits_phrase(first), 12.0, digits_phrase(second), 1.0)
        feeder.feed(audio)
        feeder.end()
        assert wait_until(lambda: len(run.sessions()) == 2, 10)
        sessions = run.sessions()
        turns = run.turns()
        assert sessions[0].reason is EndReason.INACTIVITY
        assert sessions[1].reason is EndReason.END_OF_STREAM
        first_turns = [t for t in turns if t.session == sessions[0].session]
        speech_end_us = max(t.end_ts for t in first_turns)
        silence_before_close = (sessions[0].closed - speech_end_us) / 1e6
        assert silence_before_close <= 5 + 1, silence_before_close
        assert all_digits(first_turns) == first
        assert all_digits([t for t in turns if t.session == sessions[1].session]) == second
        billed = sum(s.billed_s for s in sessions)
        report("12 s pause", billed, run.metric("transcriber_speech_seconds_total", device="hall"),
               len(all_digits(turns)), len(first) + len(second))
        print(f"[12 s pause] session 1 closed {silence_before_close:.2f} s after the last word")


def test_continuous_speech_longer_than_the_timeout_is_not_cut(
        redis_server: RedisServer, double: DoubleServer) -> None:
    phrases = [[4, 0, 5], [6, 1, 9], [2, 8, 3], [7, 7, 1]]
    parts: list[float | str] = [0.3]
    for phrase in phrases:
        parts += [digits_phrase(phrase), 0.25]  # pauses shorter than the detector's hangover
    with running_worker(redis_server.url, double, {"INACTIVITY_TIMEOUT_S": "1.5"}) as run:
        feeder = AudioFeeder(run.client, "desk")
        feeder.heartbeat()
        assert wait_until(lambda: run.worker.devices() == ["desk"], 5)
        feeder.feed(compose(*parts, 0.5))
        feeder.end()
        assert wait_until(lambda: len(run.sessions()) >= 1, 10)
        sessions = run.sessions()
        assert [s.reason for s in sessions] == [EndReason.END_OF_STREAM]
        assert all_digits(run.turns()) == [d for p in phrases for d in p]


def test_a_connection_dropped_mid_utterance_loses_and_repeats_nothing(
        redis_server: RedisServer, double: DoubleServer) -> None:
    digits = [5, 2, 9, 4, 1, 7, 3, 6, 8, 0]
    with running_worker(redis_server.url, double) as run:
        feeder = AudioFeeder(run.client, "lab")
        feeder.heartbeat()
        assert wait_until(lambda: run.worker.devices() == ["lab"], 5)
        feeding = feeder.feed_in_thread(compose(0.5, digits_phrase(digits), 1.5))
        session = double.wait_for_session(0, timeout=10)
        assert wait_until(lambda: len(double.record(session.session_id or "").audio) > 32000 * 2,
                          10)  # 2 s of audio in: mid-utterance
        double.drop(session.session_id)
        feeding.join(30)
        assert wait_until(lambda: any(s.reason is EndReason.END_OF_STREAM
                                      for s in run.sessions()), 15)
        sessions = run.sessions()
        assert sessions[0].reason is EndReason.ERROR
        assert all_digits(run.turns()) == digits  # every digit, exactly once
        assert run.metric("transcriber_errors_total", device="lab", code="network") >= 1


def test_a_bad_key_backs_off_without_a_hot_loop_and_other_devices_go_on(
        redis_server: RedisServer, double: DoubleServer) -> None:
    with running_worker(redis_server.url, double, api_key="wrong-key") as run:
        speaker, quiet = AudioFeeder(run.client, "a"), AudioFeeder(run.client, "b")
        speaker.heartbeat()
        quiet.heartbeat()
        assert wait_until(lambda: run.worker.devices() == ["a", "b"], 5)
        quiet_feed = quiet.feed_in_thread(compose(5.0))
        speaker.feed(compose(0.3, digits_phrase([1, 2, 3]), 0.3, digits_phrase([4, 5]), 2.5))
        quiet_feed.join(10)
        attempts = len(double.records())
        assert attempts == 1, f"{attempts} connection attempts in 4 s: a hot loop"
        assert run.metric("transcriber_auth_failures_total") == 1
        assert run.metric("transcriber_errors_total", device="a", code="1008") == 1
        assert run.metric("transcriber_frames_total", device="b") == 100  # b read throughout
        assert run.worker.health()[0]


def test_malformed_entries_never_crash_the_worker(redis_server: RedisServer,
                                                   double: DoubleServer) -> None:
    fields = st.dictionaries(
        st.sampled_from([b"run", b"seq", b"ts", b"rate", b"ch", b"fmt", b"pcm", b"eos", b"x"]),
        st.one_of(st.binary(max_size=40), st.integers(-2**70, 2**70).map(lambda i: str(i).encode()),
                  st.sampled_from([b"16000", b"1", b"s16le", b"0", b"1600"])),
        min_size=1)
    with running_worker(redis_server.url, double) as run:
        feeder = AudioFeeder(run.client, "fuzz")
        feeder.heartbeat()
        assert wait_until(lambda: run.worker.devices() == ["fuzz"], 5)
        key = Keys().audio("fuzz")

        @settings(max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(st.lists(fields, min_size=1, max_size=4))
        def inject(entries: list[dict[bytes, bytes]]) -> None:
            for entry in entries:
                run.client.xadd(key, entry)  # type: ignore[arg-type]

        inject()
        feeder.feed(compose(0.5, digits_phrase([3, 1, 4]), 1.0))
        feeder.end()
        assert wait_until(lambda: all_digits(run.turns()) == [3, 1, 4], 10)
        skipped = sum(s.value for m in run.registry.collect()
                      if m.name == "transcriber_frames_skipped" for s in m.samples
                      if s.name.endswith("_total"))
        assert skipped > 0
        assert run.worker.health()[0]


def test_two_devices_at_once_never_mix(redis_server: RedisServer, double: DoubleServer) -> None:
    a_digits, b_digits = [1, 1, 2, 2, 3], [7, 8, 9, 0, 6]
    with running_worker(redis_server.url, double) as run:
        a, b = AudioFeeder(run.client, "left"), AudioFeeder(run.client, "right")
        a.heartbeat()
        b.heartbeat()
        assert wait_until(lambda: run.worker.devices() == ["left", "right"], 5)
        threads = [a.feed_in_thread(compose(0.5, digits_phrase(a_digits), 1.0)),
                   b.feed_in_thread(compose(0.7, digits_phrase(b_digits), 1.0))]
        for thread in threads:
            thread.join(20)
        assert wait_until(lambda: len(run.sessions()) == 2, 10)
        turns = run.turns()
        assert all_digits(turns, "left") == a_digits
        assert all_digits(turns, "right") == b_digits


def test_a_device_registered_later_is_picked_up_within_5_s(redis_server: RedisServer,
                                                            double: DoubleServer) -> None:
    with running_worker(redis_server.url, double) as run:
        assert run.worker.devices() == []
        AudioFeeder(run.client, "late").heartbeat()
        assert wait_until(lambda: run.worker.devices() == ["late"], 5)


def test_registry_entries_that_are_not_devices_are_ignored(redis_client: redis.Redis,
                                                           redis_server: RedisServer,
                                                           double: DoubleServer) -> None:
    redis_client.hset(Keys().devices, "bad id with spaces", "{}")
    redis_client.hset(Keys().devices, "ok", "not json")
    with running_worker(redis_server.url, double) as run:
        assert not wait_until(lambda: bool(run.worker.devices()), 2)
        assert run.worker.health()[0]
