"""A real redis-server child process on a free loopback port, stoppable and restartable."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from tests.support.procs import stop_process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """``redis-server`` started as a plain child (not daemonized: PID 1 here reaps no orphans)."""

    def __init__(self, binary: str, port: int | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self._dir = tempfile.TemporaryDirectory(prefix="edgescribe-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        log = Path(self._dir.name) / "redis.log"
        self._proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self._dir.name, "--logfile", str(log),
             *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except (redis.AuthenticationError, redis.ResponseError):
                break  # a password-protected server refusing us (NOAUTH) is up
            except redis.ConnectionError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    msg = f"redis-server did not start on {self.port}: {log.read_text()[-500:]}"
                    self.stop()
                    raise RuntimeError(msg) from None
                time.sleep(0.02)
            finally:
                client.close()

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None

    def kill(self) -> None:
        """Hard stop, like a crash or a pulled cable: no clean shutdown."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(5)
            self._proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()
