"""Stopping the child processes the tests start (servers, services)."""

from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None,
                 grace_s: float = 5.0) -> int | None:
    """SIGTERM, wait ``grace_s``, then SIGKILL; returns the exit status (None if no process)."""
    if proc is None:
        return None
    proc.terminate()
    try:
        return proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)
