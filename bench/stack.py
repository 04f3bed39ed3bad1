"""The processes a benchmark runs: redis-server, the double, the transcriber, the feeder.

Each is a child process (so each can be measured on its own and none steals the others' GIL),
started from the repository root with this interpreter, stopped with SIGTERM, and killed if it
does not stop. Their stderr goes to files in a temporary directory, shown when one fails.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from bench.audio import FeedPlan
from bench.common import REPO
from tests.support.redisserver import RedisServer

API_KEY = "test-key"


class ChildFailed(RuntimeError):
    pass


class Child:
    """A child that prints one line (its URL, or ``ready``) when it is ready."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], workdir: Path,
                 ready_timeout: float = 60.0) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log: IO[str] = self.log_path.open("w")
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True)
        self.first_line = self._read_line(ready_timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_line(self, timeout: float) -> str:
        stdout = self.proc.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline().strip() if ready else ""
        if not line:
            self.kill()
            raise ChildFailed(f"{self.name} did not start: {self.tail()}")
        return line

    def tail(self, chars: int = 2000) -> str:
        self._log.flush()
        return self.log_path.read_text()[-chars:]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ChildFailed(f"{self.name} did not finish in {timeout:.0f} s: "
                              f"{self.tail()}") from None

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Stack:
    """Context manager owning every child of one benchmark run."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="edgescribe-bench-")
        self.dir = Path(self._tmp.name)
        self._children: list[Child] = []
        self._count = 0
        self.redis: RedisServer | None = None

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        for child in self._children:
            child.kill()
        if self.redis is not None:
            self.redis.close()
        self._tmp.cleanup()

    def path(self, name: str) -> Path:
        self._count += 1
        return self.dir / f"{self._count:03d}-{name}"

    def start_redis(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ChildFailed("redis-server is not installed (scripts/install-system-deps)")
        self.redis = RedisServer(binary)
        self.redis.start()
        return self.redis

    def _child(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, [sys.executable, *argv], env or _base_env(), self.dir)
        self._children.append(child)
        return child

    def double(self, recogniser: str = "cheap") -> DoubleChild:
        out = self.path("double.json")
        child = self._child("double", ["-m", "bench.double_proc", str(out),
                                       "--recogniser", recogniser])
        return DoubleChild(child, out)

    def worker(self, double_url: str, extra_env: dict[str, str] | None = None) -> WorkerChild:
        assert self.redis is not None
        out = self.path("worker.json")
        env = _base_env()
        env.update({"REDIS_URL": self.redis.url, "ASSEMBLYAI_API_KEY": API_KEY,
                     "ASSEMBLYAI_URL": double_url, "METRICS_PORT": "0", "LOG_LEVEL": "WARNING",
                     # The shared new-session budget (default 60/min) would hold hundreds of
                     # devices that start speaking at once in WAITING; it is not what is measured.
                     "TRANSCRIBER_SESSIONS_PER_MINUTE": "100000",
                     **(extra_env or {})})
        child = self._child("worker", ["-m", "bench.worker_proc", str(out)], env)
        return WorkerChild(child, out)

    def feeder(self, *, devices: int, seconds: float, start: float,
               lead: tuple[float, float] = (0.5, 3.0), prefix: str = "bench",
               namespace: str = "edgescribe:", eos: bool = True, seed: int = 1,
               track: Path | None = None) -> FeederChild:
        assert self.redis is not None
        plan, stats = self.path("plan.json"), self.path("feeder.json")
        argv = ["-m", "bench.feeder_proc", "--redis-url", self.redis.url,
                "--namespace", namespace, "--devices", str(devices), "--seconds", str(seconds),
                "--start", repr(start), "--lead", str(lead[0]), str(lead[1]),
                "--prefix", prefix, "--seed", str(seed), "--plan", str(plan),
                "--stats", str(stats)]
        argv += ["--eos"] if eos else []
        argv += ["--track", str(track)] if track is not None else []
        child = self._child(f"feeder-{prefix}", argv)
        return FeederChild(child, FeedPlan.load(plan), stats)


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ASSEMBLYAI", "TRANSCRIBER", "CAPTURE", "REDIS"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class DoubleChild:
    def __init__(self, child: Child, out: Path) -> None:
        self.child = child
        self.url = child.first_line
        self._out = out

    def stop(self) -> list[dict[str, Any]]:
        self.child.stop(60)
        result: list[dict[str, Any]] = json.loads(self._out.read_text())
        return result


class WorkerChild:
    def __init__(self, child: Child, out: Path) -> None:
        self.child = child
        self._out = out

    @property
    def pid(self) -> int:
        return self.child.pid

    def stop(self) -> dict[str, Any]:
        self.child.stop(60)
        result: dict[str, Any] = json.loads(self._out.read_text())
        return result


class FeederChild:
    def __init__(self, child: Child, plan: FeedPlan, stats: Path) -> None:
        self.child = child
        self.plan = plan
        self._stats = stats

    @property
    def pid(self) -> int:
        return self.child.pid

    def wait(self, slack: float = 30.0) -> dict[str, Any]:
        left = self.plan.start + self.plan.frames * 0.05 - time.time()
        self.child.wait(max(left, 0.0) + slack)
        result: dict[str, Any] = json.loads(self._stats.read_text())
        return result
