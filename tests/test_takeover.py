"""Device ownership across replicas: leases with fencing tokens, takeover, spreading.

Real redis-server, the AssemblyAI double, espeak-ng digits; the takeover test kills a real
``python -m transcriber`` with SIGKILL. Each scenario prints what was injected, frames and words
lost and the recovery time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from capture.common.redisconn import connect
from capture.contract import Keys
from tests.double.server import DoubleServer
from tests.support.feeder import AudioFeeder
from tests.support.redisserver import RedisServer, free_port
from tests.support.speech import compose, digits_phrase
from tests.support.tcpproxy import TcpProxy
from tests.support.transcribing import all_digits, report, running_worker, wait_until
from transcriber.lease import Lease, Leases
from transcriber.publisher import Publisher
from transcriber.records import EndReason, SessionRecord, TurnRecord

KEYS = Keys()




def turn(session: str, order: int, text: str) -> TurnRecord:
    return TurnRecord("mic", session, order, True, text, (), 0, 0, 1.0)


def session_record(session: str) -> SessionRecord:
    return SessionRecord("mic", session, 1, 2, EndReason.SHUTDOWN, 1.0, 1.0, None)


def pending(client: redis.Redis, device: str, group: str = "g") -> int:
    return int(client.xpending(KEYS.audio(device), group)["pending"])


def pending_seqs(client: redis.Redis, device: str, group: str = "transcribers") -> list[int]:
    key = KEYS.audio(device)
    ids = {p["message_id"] for p in client.xpending_range(key, group, "-", "+", 100_000)}
    return [int(f[b"seq"]) for entry_id, f in client.xrange(key) if entry_id in ids]


def read_as(client: redis.Redis, device: str, consumer: str, group: str = "g") -> list[bytes]:
    reply = client.xreadgroup(group, consumer, {KEYS.audio(device): ">"})
    return [entry_id for entry_id, _ in reply[0][1]]  # type: ignore[index]


# --- the fenced publisher ----------------------------------------------------------------------

def test_a_fenced_out_publisher_has_its_turns_and_acks_refused(redis_client: redis.Redis,
                                                                redis_server: RedisServer) -> None:
    redis_client.xgroup_create(KEYS.audio("mic"), "g", id="0", mkstream=True)
    for i in range(4):
        redis_client.xadd(KEYS.audio("mic"), {"x": i})
    first, second, third, fourth = read_as(redis_client, "mic", "a")
    a = Leases(redis_client, KEYS, "worker-a", ttl_s=0.3)
    b = Leases(redis_client, KEYS, "worker-b", ttl_s=5)
    lease_a = a.acquire("mic")
    assert lease_a is not None
    refusals: list[int] = []
    publisher = Publisher(redis_server.client(), KEYS, "mic", "g", time.monotonic,
                          guard=a.guard(lease_a), on_fenced=refusals.append)
    publisher.turn(turn("s1", 0, "one"), [first])
    assert publisher.flush()
    assert redis_client.xlen(KEYS.turns) == 1 and pending(redis_client, "mic") == 3

    # Expired, and nobody took the device meanwhile (a pause, a stall): still ours.
    time.sleep(0.4)
    assert not redis_client.exists(a.lease_key("mic"))
    publisher.turn(turn("s1", 1, "two"), [second])
    assert publisher.flush()
    assert redis_client.get(a.lease_key("mic")) == lease_a.holder.encode()  # taken back
    assert redis_client.xlen(KEYS.turns) == 2 and not refusals

    # Another worker acquires it: from now on this one is fenced out.
    time.sleep(0.4)
    lease_b = b.acquire("mic")
    assert lease_b is not None and lease_b.token > lease_a.token
    publisher.turn(turn("s1", 2, "three"), [third])
    publisher.ack([fourth])
    publisher.session(session_record("s1"))
    assert publisher.flush()
    assert refusals == [1] and publisher.refused == 1
    assert [t.text for t in (TurnRecord.from_fields(f)
                             for _, f in redis_client.xrange(KEYS.turns))] == ["one", "two"]
    assert pending(redis_client, "mic") == 2  # left for the new owner to transcribe
    assert redis_client.xlen(KEYS.sessions) == 1  # what was billed is still recorded
    assert not a.renew(lease_a) and b.renew(lease_b)
    report("fenced publisher", injected="lease expired, then acquired by another worker",
           turns_refused=publisher.refused, audio_left_pending=pending(redis_client, "mic"))


def test_renew_takes_back_only_a_lease_nobody_acquired_since(redis_client: redis.Redis) -> None:
    a = Leases(redis_client, KEYS, "worker-a", ttl_s=0.2)
    b = Leases(redis_client, KEYS, "worker-b", ttl_s=0.2)
    lease_a = a.acquire("mic")
    assert lease_a is not None and a.acquire("mic") is None and b.acquire("mic") is None
    time.sleep(0.3)
    assert a.renew_all([lease_a]) == [True]  # expired, untouched: taken back
    assert redis_client.get(a.lease_key("mic")) == lease_a.holder.encode()
    redis_client.flushall()  # Redis lost its data: the counter is restored to a's token
    assert a.renew(lease_a)
    assert redis_client.get(a.fence_key("mic")) == str(lease_a.token).encode()
    time.sleep(0.3)
    lease_b = b.acquire("mic")
    assert lease_b is not None and lease_b.token == lease_a.token + 1
    assert a.renew_all([lease_a]) == [False]
    a.release(lease_a)  # not a's to release
    assert b.renew(lease_b)
    time.sleep(0.3)
    b.release(lease_b)  # expired; nobody took it: b may still release it (a no-op)
    assert not a.renew(lease_a)  # b acquired after a: a stays fenced out even now


def test_a_write_whose_reply_was_lost_is_not_applied_twice(redis_client: redis.Redis,
                                                           redis_server: RedisServer) -> None:
    redis_client.xgroup_create(KEYS.audio("mic"), "g", id="0", mkstream=True)
    redis_client.xadd(KEYS.audio("mic"), {"x": 1})
    [entry] = read_as(redis_client, "mic", "a")
    leases = Leases(redis_client, KEYS, "worker-a", ttl_s=30)
    lease = leases.acquire("mic")
    assert lease is not None
    with TcpProxy("127.0.0.1", redis_server.port) as proxy:
        client = connect(proxy.url, socket_timeout=0.5)
        publisher = Publisher(client, KEYS, "mic", "g", time.monotonic,
                              guard=leases.guard(lease))
        publisher.ack([b"0-1"])  # a first write loads the script (a stalled EVALSHA would
        assert publisher.flush()  # fail with NOSCRIPT when it finally arrived)
        publisher.turn(turn("s1", 0, "one"), [entry])
        proxy.stall()
        assert not publisher.flush()  # timed out: was it written? the client cannot know
        proxy.resume()  # ...the held request arrives after all and is executed
        assert wait_until(lambda: redis_client.xlen(KEYS.turns) == 1, 5)
        publisher._retry_at = 0.0  # retry now, not after the backoff
        assert publisher.flush()  # the retry is recognised as already applied
        assert redis_client.xlen(KEYS.turns) == 1
        assert pending(redis_client, "mic") == 0
        client.close()


# --- a worker that loses its lease -------------------------------------------------------------

@pytest.mark.slow
def test_a_worker_that_loses_its_lease_stops_at_once_and_its_turns_are_refused(
        redis_server: RedisServer, double: DoubleServer) -> None:
    digits = [3, 8, 1, 6, 9, 2, 7, 4]
    env = {"TRANSCRIBER_LEASE_TTL_S": "3", "INACTIVITY_TIMEOUT_S": "1.5"}
    with running_worker(redis_server.url, double, env) as run:
        feeder = AudioFeeder(run.client, "lobby")
        feeder.heartbeat()
        assert wait_until(lambda: run.worker.devices() == ["lobby"], 5)
        feeding = feeder.feed_in_thread(compose(0.5, digits_phrase(digits), 4.0))
        session = double.wait_for_session(0, timeout=10)
        assert wait_until(lambda: len(double.record(session.session_id or "").audio) > 32000, 10)

        # Another replica takes the device over (as after an expiry: a new token, its holder
        # value), then does nothing with it.
        thief = Leases(run.client, KEYS, "thief", ttl_s=30)
        token = int(run.client.incr(thief.fence_key("lobby")))
        stolen = Lease("lobby", f"thief:{token}", token)
        run.client.set(thief.lease_key("lobby"), stolen.holder, px=30_000)
        stolen_at = time.monotonic()
        assert wait_until(lambda: double.record(session.session_id or "").closed_at is not None,
                          5)
        closed = double.record(session.session_id or "")
        stop_latency = (closed.terminate_at or closed.closed_at or 0) - stolen_at
        assert stop_latency < 1.5, stop_latency  # one discovery round, not a lease TTL
        sent_by_then = len(closed.audio)
        assert wait_until(lambda: run.worker.devices() == [], 5)
        assert run.turns() == []  # its final turn (after Terminate) was refused
        assert run.metric("transcriber_errors_total", device="lobby", code="fenced") >= 1
        left = pending(run.client, "lobby", "transcribers")
        assert left > 0  # the audio it could not confirm stays for the owner

        # The thief gives the device back without using it: the worker takes it again and
        # transcribes that audio from the stream, each word once.
        thief.release(stolen)
        feeding.join(15)
        assert wait_until(lambda: all_digits(run.turns()) == digits, 20), run.turns()
        assert wait_until(lambda: len(run.sessions()) == 2, 10)
        # The fenced-out session is still on record (it was billed), then the resumed one.
        assert [s.reason for s in run.sessions()] == [EndReason.SHUTDOWN, EndReason.INACTIVITY]
        assert all_digits(run.turns()) == digits
        ids = [t.id for t in run.turns()]
        assert len(ids) == len(set(ids))
        report("lease lost", injected="lease taken by another holder mid-utterance",
               stopped_streaming_after_s=round(stop_latency, 3),
               audio_sent_before_stop_s=round(sent_by_then / 32000, 2),
               turns_refused=int(run.metric("transcriber_errors_total", device="lobby",
                                            code="fenced")),
               entries_left_pending=left, words_lost=len(digits) - len(all_digits(run.turns())))


# --- takeover after SIGKILL --------------------------------------------------------------------

def transcriber_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ASSEMBLYAI", "TRANSCRIBER", "REDIS", "METRICS"))}
    env.update(extra)
    return env


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric_sum(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
               **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all((k, want) in ls for k, want in labels.items()))


@pytest.mark.slow
def test_sigkill_mid_utterance_another_replica_takes_over_and_nothing_is_lost_or_repeated(
        redis_server: RedisServer, double: DoubleServer, tmp_path: Path) -> None:
    ttl = 3.0
    digits = [5, 0, 2, 8, 6, 1, 9, 3, 7, 4]
    ports = {"w1": free_port(), "w2": free_port()}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: tmp_path / f"{name}.log" for name in ports}
    client = redis_server.client()
    try:
        for worker_id, port in ports.items():
            env = transcriber_env(
                REDIS_URL=redis_server.url, ASSEMBLYAI_API_KEY="test-key",
                ASSEMBLYAI_URL=double.url, METRICS_PORT=str(port),
                TRANSCRIBER_WORKER_ID=worker_id, TRANSCRIBER_LEASE_TTL_S=str(ttl),
                INACTIVITY_TIMEOUT_S="1.5", TRANSCRIBER_RECONNECT_BACKOFF_S="0.2",
                TRANSCRIBER_DEVICE_GONE_AFTER_S="5", LOG_LEVEL="INFO")
            with logs[worker_id].open("wb") as out:
                procs[worker_id] = subprocess.Popen([sys.executable, "-m", "transcriber"],
                                                    env=env, stdout=out, stderr=subprocess.STDOUT)
        assert wait_until(lambda: client.hlen(f"{KEYS.namespace}workers") == 2, 15)
        feeder = AudioFeeder(client, "atrium")
        feeder.heartbeat()
        lease_key = Leases(client, KEYS, "-", ttl).lease_key("atrium")
        assert wait_until(lambda: client.exists(lease_key) == 1, 10)
        owner = (client.get(lease_key) or b"").decode().split(":")[0]
        survivor = "w2" if owner == "w1" else "w1"
        spoken = compose(digits_phrase(digits))
        feeding = feeder.feed_in_thread(compose(0.5, spoken, 4.0))
        session = double.wait_for_session(0, timeout=10)
        # ~1.6 s of the ~4.5 s utterance sent: the worker dies mid-word, no final turn yet
        assert wait_until(lambda: len(double.record(session.session_id or "").audio) > 52_000,
                          10)
        procs[owner].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        procs[owner].wait(5)

        assert wait_until(lambda: (client.get(lease_key) or b"").startswith(survivor.encode()),
                          ttl + 2.5, interval=0.02)
        takeover_s = time.monotonic() - killed_at
        assert takeover_s <= ttl + 2, takeover_s

        def heard() -> list[int]:
            return all_digits([TurnRecord.from_fields(f) for _, f in client.xrange(KEYS.turns)])

        assert wait_until(lambda: heard() == digits, 20), heard()
        recovered_s = time.monotonic() - killed_at
        feeding.join(15)
        # the survivor's session ends (the killed one's never does: it was never recorded)
        assert wait_until(lambda: client.xlen(KEYS.sessions) == 1, 10)
        turns = [TurnRecord.from_fields(f) for _, f in client.xrange(KEYS.turns)]
        assert all_digits(turns) == digits  # the interrupted utterance: each word once, in order
        assert len({t.id for t in turns}) == len(turns)
        samples = scrape(ports[survivor])
        skipped = metric_sum(samples, "transcriber_frames_skipped_total", device="atrium")
        missing = metric_sum(samples, "transcriber_frames_missing_total", device="atrium")
        assert missing == 0 and skipped == 0
        # Nothing of the utterance left unacknowledged: what is pending is trailing silence
        # (the idle pre-roll, and acknowledgements that go out once a second).
        speech_end_seq = int((0.5 + len(spoken) / 16000) * 20)
        assert min(pending_seqs(client, "atrium"), default=10**9) > speech_end_seq
        report("SIGKILL takeover", injected=f"SIGKILL of {owner} mid-utterance (lease TTL {ttl} s)",
               takeover_after_s=round(takeover_s, 2),
               all_words_published_after_s=round(recovered_s, 2),
               frames_lost=int(skipped + missing), words_lost=len(digits) - len(all_digits(turns)))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(12)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        client.close()
    for name, path in logs.items():
        output = path.read_text()
        assert "Traceback" not in output, f"{name}:\n{output}"


# --- pending entries of a dead owner -----------------------------------------------------------

@pytest.mark.slow
def test_stale_pending_entries_are_skipped_and_counted_fresh_ones_replayed(
        redis_server: RedisServer, redis_client: redis.Redis, double: DoubleServer) -> None:
    """A consumer that died long ago left old entries pending, then fresh speech: the new owner
    skips (and counts) the old ones and transcribes the fresh ones."""
    key, group = KEYS.audio("vault"), "transcribers"
    redis_client.xgroup_create(key, group, id="0", mkstream=True)
    feeder = AudioFeeder(redis_client, "vault")
    old_ms = int(time.time() * 1000) - 120_000
    stale_entries = 40
    for seq in range(stale_entries):
        feeder.client.xadd(key, {"run": "old", "seq": seq, "ts": (old_ms + seq * 50) * 1000,
                                 "rate": 16000, "ch": 1, "fmt": "s16le", "pcm": b"\0" * 1600},
                           id=f"{old_ms + seq}-0")
    digits = [4, 4, 2, 9]
    feeder.feed(compose(0.5, digits_phrase(digits), 1.0), speed=0)
    feeder.end()
    redis_client.xreadgroup(group, "long-dead", {key: ">"})
    assert redis_client.xpending(key, group)["pending"] == stale_entries + feeder.seq + 1
    with running_worker(redis_server.url, double, {"TRANSCRIBER_STALE_AFTER_S": "10"}) as run:
        assert wait_until(lambda: all_digits(run.turns()) == digits, 15), run.turns()
        assert run.metric("transcriber_frames_skipped_total", device="vault",
                          reason="stale") == stale_entries
        assert wait_until(lambda: redis_client.xpending(key, group)["pending"] == 0, 10)


# --- spreading ---------------------------------------------------------------------------------

def heartbeat_devices(client: redis.Redis, devices: list[str],
                      stop: threading.Event) -> threading.Thread:
    feeders = [AudioFeeder(client, d) for d in devices]

    def beat() -> None:
        while not stop.is_set():
            for feeder in feeders:
                feeder.heartbeat()
            stop.wait(0.5)

    thread = threading.Thread(target=beat, name="heartbeats", daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_devices_spread_over_replicas_and_come_back_when_one_leaves(
        redis_server: RedisServer, redis_client: redis.Redis, double: DoubleServer) -> None:
    devices = ["d1", "d2", "d3", "d4"]
    stop = threading.Event()
    beats = heartbeat_devices(redis_client, devices, stop)
    env = {"TRANSCRIBER_LEASE_TTL_S": "3"}
    try:
        with running_worker(redis_server.url, double,
                            {**env, "TRANSCRIBER_WORKER_ID": "a",
                             "TRANSCRIBER_MAX_DEVICES": "3"}) as a:
            # Alone, it takes what its TRANSCRIBER_MAX_DEVICES allows, and no more.
            assert wait_until(lambda: len(a.worker.devices()) == 3, 6)
            assert not wait_until(lambda: len(a.worker.devices()) > 3, 2)
            with running_worker(redis_server.url, double,
                                {**env, "TRANSCRIBER_WORKER_ID": "b"}) as b:
                started = time.monotonic()
                assert wait_until(lambda: len(a.worker.devices()) == 2
                                  and len(b.worker.devices()) == 2, 10), \
                    (a.worker.devices(), b.worker.devices())
                balanced_s = time.monotonic() - started
                assert set(a.worker.devices()) | set(b.worker.devices()) == set(devices)
                assert not wait_until(lambda: len(a.worker.devices()) != 2, 2)  # stable
            left = time.monotonic()
            # b left the roll and released its leases: a takes up to its maximum again.
            assert wait_until(lambda: len(a.worker.devices()) == 3, 5)
            back_s = time.monotonic() - left
        report("spreading", devices=4, balanced_2_2_after_s=round(balanced_s, 2),
               back_to_max_after_leave_s=round(back_s, 2))
    finally:
        stop.set()
        beats.join(5)


@pytest.mark.slow
def test_a_device_no_replica_has_room_for_is_taken_beyond_the_fair_share(
        redis_server: RedisServer, redis_client: redis.Redis, double: DoubleServer) -> None:
    devices = ["e1", "e2", "e3", "e4"]
    stop = threading.Event()
    beats = heartbeat_devices(redis_client, devices, stop)
    # The default TTL: this test is about spreading, and a 3 s lease can lapse on a loaded CI box.
    env = {"TRANSCRIBER_LEASE_TTL_S": "10"}
    try:
        with running_worker(redis_server.url, double, {**env, "TRANSCRIBER_WORKER_ID": "small",
                                                       "TRANSCRIBER_MAX_DEVICES": "1"}) as small, \
                running_worker(redis_server.url, double,
                               {**env, "TRANSCRIBER_WORKER_ID": "big"}) as big:
            # Fair share 2 each, but "small" can hold only 1: "big" takes the one left over.
            assert wait_until(lambda: len(small.worker.devices()) == 1
                              and len(big.worker.devices()) == 3, 10), \
                (small.worker.devices(), big.worker.devices())
            assert not wait_until(lambda: len(big.worker.devices()) != 3, 3)  # no ping-pong
    finally:
        stop.set()
        beats.join(5)
