"""Hostile input: fuzzed stream entries and registry values, oversized frames, wrong formats,
odd device ids, keys deleted or replaced under the worker.

Each problem is counted, logged once per kind, never fatal; a healthy device speaking at the
same time gets every one of its digits. Real redis-server, the AssemblyAI double, espeak-ng.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capture.contract import AudioFrame, EndOfStream, Keys, MalformedEntry, decode_entry
from tests.double.server import DoubleServer
from tests.support.feeder import AudioFeeder
from tests.support.redisserver import RedisServer
from tests.support.speech import compose, digits_phrase
from tests.support.transcribing import RunningWorker, all_digits, report, running_worker, wait_until

pytestmark = pytest.mark.slow
KEYS = Keys()
HEALTHY = "clean"




def skipped(run: RunningWorker, device: str) -> Counter[str]:
    return Counter({s.labels["reason"]: int(s.value) for m in run.registry.collect()
                    if m.name == "transcriber_frames_skipped" for s in m.samples
                    if s.name.endswith("_total") and s.labels["device"] == device and s.value})


def problems(run: RunningWorker) -> Counter[str]:
    return Counter({s.labels["kind"]: int(s.value) for m in run.registry.collect()
                    if m.name == "transcriber_registry_problems" for s in m.samples
                    if s.name.endswith("_total")})


def warnings_by_text(caplog: pytest.LogCaptureFixture, needle: str) -> int:
    return sum(needle in r.getMessage() for r in caplog.records
               if r.name.startswith("transcriber"))


def assert_nothing_unexpected(caplog: pytest.LogCaptureFixture) -> None:
    crashes = [r.getMessage() for r in caplog.records
               if r.levelno >= logging.ERROR or r.exc_info is not None]
    assert not crashes, crashes


def start_healthy(run: RunningWorker) -> AudioFeeder:
    feeder = AudioFeeder(run.client, HEALTHY)
    feeder.heartbeat()
    assert wait_until(lambda: HEALTHY in run.worker.devices(), 5)
    return feeder


# --- stream entries ------------------------------------------------------------------------------

GOOD = {b"run": b"r1", b"seq": b"7", b"ts": b"1700000000000000", b"rate": b"16000", b"ch": b"1",
        b"fmt": b"s16le", b"pcm": b"\x01\x00" * 800}


def _with(**changes: bytes | None) -> dict[bytes, bytes]:
    entry = dict(GOOD)
    for name, value in changes.items():
        if value is None:
            entry.pop(name.encode(), None)
        else:
            entry[name.encode()] = value
    return entry


_NEAR_MISSES = st.one_of(
    st.sampled_from([b"8000", b"44100", b"48000", b"0", b"-16000", b"16000.0", b"1e5",
                     b"99999999999999999999999"]).map(lambda v: _with(rate=v)),
    st.sampled_from([b"2", b"0", b"-1", b"6"]).map(lambda v: _with(ch=v)),
    st.sampled_from([b"f32le", b"s16be", b"", "s16le\u00e9".encode(), b"S16LE"])
    .map(lambda v: _with(fmt=v)),
    st.integers(32_001, 100_000).map(lambda n: _with(pcm=b"\0" * (2 * n))),  # oversized
    st.sampled_from([2, 800, 1598, 1602, 3200, 32_000]).map(lambda n: _with(pcm=b"\0" * n)),
    st.integers(0, 4000).filter(lambda n: n % 2 == 1).map(lambda n: _with(pcm=b"\0" * n)),
    st.sampled_from(["run", "seq", "ts", "rate", "ch", "fmt", "pcm"])
    .map(lambda name: _with(**{name: None})),
    st.sampled_from([b"-5", b"x", b"1.5", b"", "\u0663".encode()]).map(lambda v: _with(seq=v)),
    st.sampled_from([b"soon", b"", b"1e16"]).map(lambda v: _with(ts=v)),
    st.sampled_from([b"\xff\xfe", "r\u00fcn".encode()]).map(lambda v: _with(run=v)),
)
_RANDOM = st.dictionaries(
    st.sampled_from([b"run", b"seq", b"ts", b"rate", b"ch", b"fmt", b"pcm", b"eos", b"x"]),
    st.one_of(st.binary(max_size=40), st.integers(-2**70, 2**70).map(lambda i: str(i).encode()),
              st.sampled_from([b"16000", b"1", b"s16le", b"0", b"1600"])),
    min_size=1)
ENTRIES = st.one_of(_NEAR_MISSES, _RANDOM)


def unusable(entry: dict[bytes, bytes]) -> bool:
    """Whether the worker must skip (and count) this entry; an end-of-stream is not skipped."""
    try:
        decoded = decode_entry(entry)
    except MalformedEntry:
        return True
    if isinstance(decoded, EndOfStream):
        return False
    assert isinstance(decoded, AudioFrame)
    assert len(decoded.pcm) != 1600, "the strategy made a usable frame"
    return True


def test_fuzzed_stream_entries_are_skipped_counted_and_logged_once(
        redis_server: RedisServer, double: DoubleServer,
        caplog: pytest.LogCaptureFixture) -> None:
    digits = [2, 7, 1, 8, 2, 8]
    junk = ["junk1", "junk2"]
    expected: Counter[str] = Counter()
    with running_worker(redis_server.url, double) as run:
        for device in junk:
            AudioFeeder(run.client, device).heartbeat()
        healthy = start_healthy(run)
        assert wait_until(lambda: sorted(run.worker.devices()) == sorted([HEALTHY, *junk]), 5)
        speaking = healthy.feed_in_thread(compose(0.5, digits_phrase(digits), 1.5))
        injected = 0

        @settings(max_examples=120, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(st.sampled_from(junk), st.lists(ENTRIES, min_size=1, max_size=4))
        def inject(device: str, entries: list[dict[bytes, bytes]]) -> None:
            nonlocal injected
            for entry in entries:
                run.client.xadd(KEYS.audio(device), entry)  # type: ignore[arg-type]
                expected[device] += unusable(entry)
                injected += 1

        inject()
        speaking.join(20)
        for device in junk:
            assert wait_until(lambda d=device: skipped(run, d).total() == expected[d], 15), \
                (device, skipped(run, device), expected[device])
        assert wait_until(lambda: all_digits(run.turns(), HEALTHY) == digits, 15), run.turns()
        assert not skipped(run, HEALTHY)
        assert run.worker.health()[0]
        kinds = set(skipped(run, "junk1")) | set(skipped(run, "junk2"))
        for kind in kinds:  # logged once per kind, however many entries and devices
            assert warnings_by_text(caplog, f"skipping a frame ({kind})") == 1, kind
        assert_nothing_unexpected(caplog)
        report("fuzzed stream entries", injected=f"{injected} entries on 2 devices",
               skipped_and_counted=sum(expected.values()), kinds=sorted(kinds),
               healthy_words_lost=len(digits) - len(all_digits(run.turns(), HEALTHY)))


# --- the registry --------------------------------------------------------------------------------

ODD_IDS = [b"with space", "\u00fcn\u00efc\u00f8d\u00e9".encode(), b"{braces}", b"br}{ace",
           b"a" * 65, b"x" * 10_000, b"", b"tab\tid", b"new\nline", b"semi;colon", b"a/b",
           b"\xff\xfe\xfd", "\u0661\u0662".encode(), b"*", b"edgescribe:audio:{x}"]

REGISTRY_FIELDS = st.one_of(
    st.binary(max_size=80), st.text(max_size=80).map(lambda t: t.encode()),
    st.sampled_from(ODD_IDS))
RECORD_VALUES = st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                          st.text(max_size=20), st.none(), st.lists(st.integers(), max_size=3),
                          st.booleans())
REGISTRY_VALUES = st.one_of(
    st.binary(max_size=200),
    st.dictionaries(st.sampled_from(["run", "rate", "ch", "started", "seen", "source"]),
                    RECORD_VALUES).map(lambda d: json.dumps(d).encode()),
    st.sampled_from([b"{}", b"[]", b"null", b"1", b'"x"', b"{", b'{"seen": NaN}',
                     b'{"run":"r","rate":16000,"ch":1,"started":0,"seen":1e999}']))


def test_odd_device_ids_and_fuzzed_registry_values_never_hurt_a_healthy_device(
        redis_server: RedisServer, redis_client: redis.Redis, double: DoubleServer,
        caplog: pytest.LogCaptureFixture) -> None:
    digits = [6, 0, 2, 2, 1]
    for field in ODD_IDS:
        redis_client.hset(KEYS.devices, field, b'{"run":"r","rate":16000,"ch":1,"started":0,'
                          b'"seen":' + str(time.time() + 3600).encode() + b"}")
    with running_worker(redis_server.url, double) as run:
        healthy = start_healthy(run)
        time.sleep(3.0)  # several discovery rounds: still each counted once
        assert problems(run)["bad_device_id"] == len(ODD_IDS)
        assert warnings_by_text(caplog, "not a valid device id") == 1
        assert run.worker.devices() == [HEALTHY]

        speaking = healthy.feed_in_thread(compose(0.5, digits_phrase(digits), 1.5))
        written = 0

        @settings(max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow])
        @given(st.lists(st.tuples(REGISTRY_FIELDS, REGISTRY_VALUES), min_size=1, max_size=3))
        def scribble(pairs: list[tuple[bytes, bytes]]) -> None:
            nonlocal written
            for field, value in pairs:
                if field == HEALTHY.encode():
                    continue  # the healthy device's own heartbeat is not under test here
                redis_client.hset(KEYS.devices, field, value)
                written += 1

        scribble()
        speaking.join(20)
        assert wait_until(lambda: all_digits(run.turns(), HEALTHY) == digits, 15), run.turns()
        time.sleep(1.5)  # a discovery round over the last values
        assert run.worker.health()[0]
        counted = problems(run)
        assert counted.total() > len(ODD_IDS)
        for kind in counted:
            needle = ("not a valid device id" if kind == "bad_device_id"
                      else "ignoring its registry entry")
            assert warnings_by_text(caplog, needle) >= 1
        assert warnings_by_text(caplog, "ignoring its registry entry") <= 2  # bad_json, bad_record
        assert_nothing_unexpected(caplog)
        report("fuzzed registry", injected=f"{len(ODD_IDS)} odd ids + {written} fuzzed entries",
               counted=dict(counted),
               healthy_words_lost=len(digits) - len(all_digits(run.turns(), HEALTHY)))


# --- keys deleted or replaced under the worker ---------------------------------------------------

def test_a_stream_key_of_another_type_only_sets_that_device_aside(
        redis_server: RedisServer, redis_client: redis.Redis, double: DoubleServer,
        caplog: pytest.LogCaptureFixture) -> None:
    digits = [5, 5, 0, 3]
    AudioFeeder(redis_client, "hijacked").heartbeat()
    AudioFeeder(redis_client, "swapped").heartbeat()
    redis_client.set(KEYS.audio("hijacked"), "not a stream")
    with running_worker(redis_server.url, double) as run:
        healthy = start_healthy(run)
        assert wait_until(lambda: "swapped" in run.worker.devices(), 5)
        assert "hijacked" not in run.worker.devices()
        assert problems(run)["stream_unusable"] == 1
        # A stream replaced under the reader: that device goes, the others read on.
        redis_client.delete(KEYS.audio("swapped"))
        redis_client.hset(KEYS.audio("swapped"), "a", "b")
        healthy.feed(compose(0.5, digits_phrase(digits), 1.5))
        assert wait_until(lambda: all_digits(run.turns(), HEALTHY) == digits, 15), run.turns()
        assert wait_until(lambda: problems(run)["stream_wrong_type"] == 1, 5)
        assert wait_until(lambda: "swapped" not in run.worker.devices(), 5)
        time.sleep(1.5)
        assert problems(run)["stream_unusable"] == 1  # set aside, not retried every round
        assert run.worker.health()[0]
        assert_nothing_unexpected(caplog)


def test_the_turns_stream_deleted_or_replaced_under_the_worker(
        redis_server: RedisServer, redis_client: redis.Redis, double: DoubleServer,
        caplog: pytest.LogCaptureFixture) -> None:
    first, second, third = [1, 9, 4], [8, 3, 6], [2, 0, 7]
    with running_worker(redis_server.url, double, {"INACTIVITY_TIMEOUT_S": "1"}) as run:
        feeder = start_healthy(run)
        feeder.feed(compose(0.5, digits_phrase(first), 2.0))
        assert wait_until(lambda: all_digits(run.turns()) == first, 10)
        redis_client.delete(KEYS.turns, KEYS.sessions)
        feeder.feed(compose(0.5, digits_phrase(second), 2.0))
        assert wait_until(lambda: all_digits(run.turns()) == second, 10), run.turns()

        # Someone writes a string where the turns stream was: the turn waits, it is not lost.
        redis_client.delete(KEYS.turns)
        redis_client.set(KEYS.turns, "oops")
        feeder.feed(compose(0.5, digits_phrase(third), 2.0))
        assert wait_until(lambda: warnings_by_text(caplog, "cannot publish") == 1, 10)
        redis_client.delete(KEYS.turns)
        assert wait_until(lambda: all_digits(run.turns()) == third, 10), run.turns()
        assert run.worker.health()[0]
        assert_nothing_unexpected(caplog)
        report("turns stream deleted", injected="DEL of ns:turns and ns:sessions, then a string "
               "in place of ns:turns", words_lost=0)
