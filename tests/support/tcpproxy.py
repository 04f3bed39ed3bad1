"""A small TCP proxy for fault injection, controllable while it runs (no toxiproxy here).

    with TcpProxy("127.0.0.1", redis_port) as proxy:
        client = redis.Redis(port=proxy.port)
        proxy.stall()        # bytes are held (both ways, new connections too) until resume()
        proxy.resume()       # ...then delivered, in order: a frozen path, nothing lost
        proxy.blackhole()    # bytes are dropped; resume() then cuts those connections
        proxy.cut()          # every open connection reset (RST); cut(rst=False) closes (FIN)
        proxy.delay(0.2)     # each chunk delivered 200 ms after it arrived; delay(0) undoes

An asyncio loop on a background thread; the control methods are thread-safe and return once the
change is in effect. A stalled proxy still accepts connections (the kernel would), as a hung
server or a partitioned network does; a client learns of it only through its own timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

CHUNK = 65536
T = TypeVar("T")


class Mode(enum.Enum):
    FLOWING = "flowing"
    STALL = "stall"
    BLACKHOLE = "blackhole"


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client side and the upstream side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    blackholed: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


@dataclass
class ProxyStats:
    connections: int = 0
    bytes_up: int = 0  # client -> upstream, delivered
    bytes_down: int = 0  # upstream -> client, delivered
    bytes_dropped: int = 0
    cuts: int = 0


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = 0
        self.stats = ProxyStats()
        self._mode = Mode.FLOWING
        self._delay_s = 0.0
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._flowing: asyncio.Event | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> TcpProxy:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._flowing = asyncio.Event()
            self._flowing.set()
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, self.host, 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="tcp-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the TCP proxy did not start")
        return self

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            self._flowing_set()
            for link in list(self._links):
                self._drop(link, rst=True)
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        self._loop = None

    @property
    def url(self) -> str:
        """A redis:// URL through the proxy (for a Redis upstream)."""
        return f"redis://{self.host}:{self.port}/0"

    def ws_url(self, path: str) -> str:
        return f"ws://{self.host}:{self.port}{path}"

    @property
    def open_connections(self) -> int:
        return self._call(lambda: len(self._links))

    # --- faults ----------------------------------------------------------------------------

    def stall(self) -> None:
        """Hold every byte (existing and new connections) until ``resume``."""
        def change() -> None:
            self._mode = Mode.STALL
            self._flowing_clear()
        self._call(change)

    def blackhole(self) -> None:
        """Drop every byte from now on; the connections stay open, as after a lost route."""
        def change() -> None:
            self._mode = Mode.BLACKHOLE
            for link in self._links:
                link.blackholed = True
            self._flowing_set()
        self._call(change)

    def resume(self) -> None:
        """Back to normal: held bytes go out; connections that lost bytes are cut (they would
        have timed out, and their streams are corrupt)."""
        def change() -> None:
            self._mode = Mode.FLOWING
            for link in list(self._links):
                if link.blackholed:
                    self._drop(link, rst=True)
            self._flowing_set()
        self._call(change)

    def cut(self, *, rst: bool = True) -> int:
        """Close every open connection now (RST, or FIN with ``rst=False``); returns how many."""
        def change() -> int:
            links = list(self._links)
            for link in links:
                self._drop(link, rst=rst)
            self.stats.cuts += len(links)
            return len(links)
        return self._call(change)

    def delay(self, seconds: float) -> None:
        """Deliver every chunk ``seconds`` after it arrived (latency, not throughput)."""
        def change() -> None:
            self._delay_s = max(0.0, seconds)
        self._call(change)

    # --- internals (event-loop thread) -----------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the proxy is not running")

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(5)

    def _flowing_set(self) -> None:
        assert self._flowing is not None
        self._flowing.set()

    def _flowing_clear(self) -> None:
        assert self._flowing is not None
        self._flowing.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(client=writer, blackholed=self._mode is Mode.BLACKHOLE)
        self._links.add(link)
        self.stats.connections += 1
        try:
            assert self._flowing is not None
            await self._flowing.wait()  # a stalled path: not even the upstream connect
            if link not in self._links:
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._drop(link, rst=True)
            return
        if link not in self._links:  # cut while connecting
            _reset(up_writer)
            return
        link.upstream = up_writer
        loop = asyncio.get_running_loop()
        link.tasks = [loop.create_task(self._pump(link, reader, up_writer, up=True)),
                      loop.create_task(self._pump(link, up_reader, writer, up=False))]

    async def _pump(self, link: _Link, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, *, up: bool) -> None:
        pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.get_running_loop().create_task(self._send(link, pending, writer, up=up))
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                await pending.put((time.monotonic() + self._delay_s, data))
            await pending.put((0.0, b""))  # EOF after what is queued
            await sender
        except (OSError, asyncio.CancelledError):
            sender.cancel()
            self._drop(link, rst=True)
            return
        self._drop(link, rst=False)

    async def _send(self, link: _Link, pending: asyncio.Queue[tuple[float, bytes]],
                    writer: asyncio.StreamWriter, *, up: bool) -> None:
        assert self._flowing is not None
        while True:
            due, data = await pending.get()
            if not data:
                return
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._flowing.wait()
            if link.blackholed:
                self.stats.bytes_dropped += len(data)
                continue
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                self._drop(link, rst=True)
                return
            if up:
                self.stats.bytes_up += len(data)
            else:
                self.stats.bytes_down += len(data)

    def _drop(self, link: _Link, *, rst: bool) -> None:
        if link not in self._links:
            return
        self._links.discard(link)
        for task in link.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        for writer in (link.client, link.upstream):
            if writer is None:
                continue
            if rst:
                _reset(writer)
            else:
                with contextlib.suppress(OSError, RuntimeError):
                    writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), like a crashed peer or a middlebox reset."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError, RuntimeError):
        writer.transport.abort()
