"""The transcriber's bookkeeping pieces, one at a time: timeline, buffers, records, leases."""

from __future__ import annotations

import time

import pytest
import redis

from capture.common.errors import ConfigError
from capture.contract import FRAME_BYTES, AudioFrame, Keys
from transcriber.audio import HeldFrame, PreRoll, Timeline, Unconfirmed
from transcriber.config import TranscriberSettings
from transcriber.lease import Leases
from transcriber.publisher import Publisher
from transcriber.records import EndReason, SessionRecord, TurnRecord, WordRecord


def held(seq: int, speech: int = 0, ts0: int = 1_000_000) -> HeldFrame:
    frame = AudioFrame(run="r", seq=seq, ts_us=ts0 + seq * 50_000, pcm=b"\0" * FRAME_BYTES)
    return HeldFrame(f"{seq}-0".encode(), frame, speech)


def test_timeline_maps_session_ms_to_capture_time_across_a_gap() -> None:
    timeline = Timeline()
    assert timeline.append(1_000_000, 50) == 0
    assert timeline.append(1_050_000, 50) == 50
    assert timeline.append(9_000_000, 50) == 100  # a jump in capture time (lost frames)
    assert timeline.capture_ts(0) == 1_000_000
    assert timeline.capture_ts(75) == 1_075_000
    assert timeline.capture_ts(110) == 9_010_000
    assert timeline.capture_ts(10_000) == 9_050_000  # clamped to the end


def test_preroll_keeps_the_newest_audio() -> None:
    ring = PreRoll(ms=150)
    evicted = [h.frame.seq for i in range(6) for h in ring.push(held(i))]
    assert evicted == [0, 1, 2]
    assert [h.frame.seq for h in ring.drain()] == [3, 4, 5]


def test_unconfirmed_confirms_sent_audio_up_to_the_last_word_and_resends_the_rest() -> None:
    buf = Unconfirmed(max_ms=10_000)
    buf.extend(held(i, speech=50) for i in range(6))
    timeline = Timeline()
    for h in buf.take_unsent(200):
        h.sent_at_ms = timeline.append(h.frame.ts_us, h.duration_ms)
    assert buf.has_unsent()  # two frames still unsent
    done = buf.confirm_until(120)  # a final turn whose last word ends at 120 ms
    assert [h.frame.seq for h in done] == [0, 1]
    buf.rewind()
    assert [h.frame.seq for h in buf.unsent()] == [2, 3, 4, 5]


def test_unconfirmed_overflow_drops_the_oldest() -> None:
    buf = Unconfirmed(max_ms=100)
    lost = buf.extend(held(i) for i in range(4))
    assert [h.frame.seq for h in lost] == [0, 1]


def test_records_round_trip_through_redis_fields() -> None:
    turn = TurnRecord(device="kitchen", session="s1", turn=3, final=True, text="Four two.",
                      words=(WordRecord("four", 0, 300, 0.9), WordRecord("two", 350, 700, 0.8)),
                      start_ts=1, end_ts=2, eot_confidence=1.0)
    fields = {k.encode(): str(v).encode() for k, v in turn.to_fields().items()}
    assert TurnRecord.from_fields(fields) == turn
    assert turn.to_fields()["id"] == "s1:3"
    session = SessionRecord("kitchen", "s1", 10, 20, EndReason.INACTIVITY, 7.0, 6.5, 1000)
    fields = {k.encode(): str(v).encode() for k, v in session.to_fields().items()}
    assert SessionRecord.from_fields(fields) == session


def test_settings_keep_secrets_out_of_repr() -> None:
    settings = TranscriberSettings.from_env({
        "ASSEMBLYAI_API_KEY": "sk-very-secret", "REDIS_URL": "redis://:hunter22@h:6379/0"})
    assert "sk-very-secret" not in repr(settings)
    assert "hunter22" not in repr(settings)
    assert "hunter22" not in settings.redis_url_redacted


@pytest.mark.parametrize(("env", "names"), [
    ({}, "ASSEMBLYAI_API_KEY"),
    ({"ASSEMBLYAI_API_KEY": "k", "ASSEMBLYAI_URL": "http://x"}, "ASSEMBLYAI_URL"),
    ({"ASSEMBLYAI_API_KEY": "k", "INACTIVITY_TIMEOUT_S": "soon"}, "INACTIVITY_TIMEOUT_S"),
    ({"ASSEMBLYAI_API_KEY": "k", "REDIS_URL": "redis://h:port/0"}, "REDIS_URL"),
    ({"ASSEMBLYAI_API_KEY": "k", "ASSEMBLYAI_KEYTERMS": "[1,2]"}, "ASSEMBLYAI_KEYTERMS"),
    ({"ASSEMBLYAI_API_KEY_FILE": "/nonexistent/key"}, "ASSEMBLYAI_API_KEY_FILE"),
])
def test_bad_settings_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError) as info:
        TranscriberSettings.from_env(env)
    assert str(info.value).startswith(names)


def test_publisher_acks_with_the_turn_and_keeps_records_while_redis_is_down(
        redis_server, redis_client) -> None:  # type: ignore[no-untyped-def]
    keys = Keys()
    redis_client.xgroup_create(keys.audio("d1"), "g", id="0", mkstream=True)
    entry = redis_client.xadd(keys.audio("d1"), {"x": "1"})
    redis_client.xreadgroup("g", "c", {keys.audio("d1"): ">"})
    publisher = Publisher(redis_server.client(), keys, "d1", "g", time.monotonic)
    first = TurnRecord("d1", "s", 0, True, "one", (), 0, 0, 1.0)
    publisher.turn(first, [entry])
    assert publisher.flush() is True
    assert redis_client.xpending(keys.audio("d1"), "g")["pending"] == 0

    second = TurnRecord("d1", "s", 1, True, "two", (), 0, 0, 1.0)
    redis_server.stop()
    publisher.turn(second)
    assert publisher.flush() is False
    assert publisher.backlog == 1
    redis_server.start()  # a fresh, empty server: only what was kept can appear
    assert publisher.flush() is True
    fresh = redis_server.client()
    assert [TurnRecord.from_fields(f) for _, f in fresh.xrange(keys.turns)] == [second]


def test_lease_is_exclusive_and_fenced(redis_client: redis.Redis) -> None:
    keys = Keys()
    a = Leases(redis_client, keys, "worker-a", ttl_s=0.3)
    b = Leases(redis_client, keys, "worker-b", ttl_s=0.3)
    lease_a = a.acquire("mic")
    assert lease_a is not None
    assert b.acquire("mic") is None
    assert a.renew(lease_a)
    time.sleep(0.4)  # the lease expires: worker a paused too long
    lease_b = b.acquire("mic")
    assert lease_b is not None and lease_b.token > lease_a.token
    assert not a.renew(lease_a)  # a cannot extend what b holds now
    a.release(lease_a)
    assert b.renew(lease_b)
