"""Several AssemblyAI doubles per test, each with its own configuration, all stopped after."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tests.double.config import DoubleConfig
from tests.double.server import DoubleServer

MakeDouble = Callable[..., DoubleServer]


@contextmanager
def double_maker(key: str) -> Iterator[MakeDouble]:
    """``make(**config_overrides)`` starts a double that accepts ``key``, unpaced by default."""
    servers: list[DoubleServer] = []

    def make(**overrides: object) -> DoubleServer:
        settings: dict[str, object] = {"api_keys": (key,), "enforce_pacing": False, **overrides}
        server = DoubleServer(DoubleConfig(**settings)).start()  # type: ignore[arg-type]
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
