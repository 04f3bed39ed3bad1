"""Shared fixtures: a real redis-server per test on a free port, and the AssemblyAI double."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.double.config import DoubleConfig
from tests.double.server import DoubleServer
from tests.support.redisserver import RedisServer
from tests.support.tools import require_tool


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(require_tool("redis-server"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def double() -> Iterator[DoubleServer]:
    with DoubleServer(DoubleConfig()) as server:
        yield server


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A redis-server that keeps its data across a restart (append-only file, fsync always)."""
    server = RedisServer(require_tool("redis-server"),
                         extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    try:
        yield server
    finally:
        server.close()
