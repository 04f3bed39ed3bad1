"""The shared new-session budget, against a real redis-server."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.redisserver import RedisServer
from transcriber.budget import SessionBudget

KEY = "edgescribe:test:session-budget"


@pytest.mark.parametrize("per_minute", [0, -3, True, 2.5, "10"])
def test_per_minute_must_be_a_positive_int(redis_client: redis.Redis, per_minute: object) -> None:
    with pytest.raises(ValueError, match="per_minute must be an integer >= 1"):
        SessionBudget(redis_client, KEY, per_minute)  # type: ignore[arg-type]


def test_window_must_be_positive(redis_client: redis.Redis) -> None:
    with pytest.raises(ValueError, match="window_s must be > 0"):
        SessionBudget(redis_client, KEY, 5, window_s=0)


def test_limit_is_exact_under_concurrency(redis_server: RedisServer) -> None:
    clients = [redis_server.client(), redis_server.client()]
    budgets = [SessionBudget(client, KEY, 10) for client in clients]
    barrier = threading.Barrier(8)
    granted: list[bool] = []
    lock = threading.Lock()

    def hammer(budget: SessionBudget, worker: int) -> None:
        barrier.wait(5)
        results = [budget.try_acquire(f"dev-{worker}") for _ in range(25)]
        with lock:
            granted.extend(results)

    threads = [threading.Thread(target=hammer, args=(budgets[i % 2], i), name=f"hammer-{i}")
               for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    try:
        assert len(granted) == 200
        assert granted.count(True) == 10
        assert clients[0].zcard(KEY) == 10
    finally:
        for client in clients:
            client.close()


def test_one_device_can_take_several_slots(redis_client: redis.Redis) -> None:
    budget = SessionBudget(redis_client, KEY, 5)
    assert [budget.try_acquire("mic-1") for _ in range(6)] == [True] * 5 + [False]
    assert redis_client.zcard(KEY) == 5


def test_retry_after_is_zero_while_available_and_peeks(redis_client: redis.Redis) -> None:
    budget = SessionBudget(redis_client, KEY, 2)
    for _ in range(5):
        assert budget.retry_after() == 0.0
    assert budget.try_acquire("a")
    assert budget.retry_after() == 0.0
    assert budget.try_acquire("b")
    assert not budget.try_acquire("c")
    wait = budget.retry_after()
    assert 59.0 < wait <= 60.0


def test_window_slides(redis_client: redis.Redis) -> None:
    """Entries leave one by one, each a window after it was taken (not a fixed per-minute reset)."""
    window = 0.6
    budget = SessionBudget(redis_client, KEY, 2, window_s=window)
    first = time.monotonic()
    assert budget.try_acquire("a")
    time.sleep(0.2)
    assert budget.try_acquire("b")
    assert not budget.try_acquire("c")

    wait = budget.retry_after()
    expected = window - (time.monotonic() - first)
    assert expected - 0.05 <= wait <= expected + 0.01

    time.sleep(wait)
    assert budget.try_acquire("c")  # "a" left the window: one slot, not two
    assert not budget.try_acquire("d")
    # Next is "b", taken 0.2 s after "a".
    assert 0.1 <= budget.retry_after() <= 0.2 + 0.01


def test_budgets_on_different_keys_are_independent(redis_client: redis.Redis) -> None:
    first = SessionBudget(redis_client, f"{KEY}:one", 1)
    second = SessionBudget(redis_client, f"{KEY}:two", 1)
    assert first.try_acquire("a")
    assert not first.try_acquire("a")
    assert second.retry_after() == 0.0
    assert second.try_acquire("a")
    assert not second.try_acquire("b")


def test_entries_are_stamped_with_the_server_clock(redis_client: redis.Redis) -> None:
    budget = SessionBudget(redis_client, KEY, 3)
    before_s, before_us = redis_client.time()
    assert budget.try_acquire("mic-1")
    after_s, after_us = redis_client.time()
    [(member, score)] = redis_client.zrange(KEY, 0, -1, withscores=True)
    assert before_s * 1_000_000 + before_us <= score <= after_s * 1_000_000 + after_us
    assert member.decode().split(":")[:2] == [str(int(score)), "mic-1"]


def test_the_key_expires(redis_client: redis.Redis) -> None:
    SessionBudget(redis_client, KEY, 3).try_acquire("a")
    assert 60_000 < redis_client.pttl(KEY) <= 61_000

    short = SessionBudget(redis_client, f"{KEY}:short", 3, window_s=0.3)
    assert short.try_acquire("a")
    assert 0 < redis_client.pttl(f"{KEY}:short") <= 305
    deadline = time.monotonic() + 2.0
    while redis_client.exists(f"{KEY}:short") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not redis_client.exists(f"{KEY}:short")


def test_redis_errors_propagate(redis_server: RedisServer) -> None:
    # No client-side retries (redis-py retries 3 times with backoff by default: ~8 s here).
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5,
                         retry=Retry(NoBackoff(), 0))
    budget = SessionBudget(client, KEY, 3)
    assert budget.try_acquire("a")
    redis_server.stop()
    try:
        with pytest.raises(redis.ConnectionError):
            budget.try_acquire("b")
        with pytest.raises(redis.ConnectionError):
            budget.retry_after()
    finally:
        client.close()
