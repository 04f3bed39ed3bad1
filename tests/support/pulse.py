"""A private PulseAudio server with a 16 kHz mono null sink: a real microphone, no hardware.

Whatever ``paplay`` plays into the sink comes out of its monitor source, which is the default
input; PyAudio reaches it through PortAudio's ALSA host API and the ALSA ``pulse`` plugin.
Started as a plain child (``--daemonize=no``): PID 1 here reaps no orphans.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.procs import stop_process

_CONFIG = """\
load-module module-native-protocol-unix
load-module module-null-sink sink_name=vsink rate=16000 channels=1 format=s16le
set-default-sink vsink
set-default-source vsink.monitor
"""


class PulseServer:
    def __init__(self, pulseaudio: str, pactl: str) -> None:
        self._pulseaudio = pulseaudio
        self._pactl = pactl
        self._dir = tempfile.TemporaryDirectory(prefix="edgescribe-pulse-")
        root = Path(self._dir.name)
        self._run = root / "run"
        self._home = root / "home"
        self.log = root / "pulse.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self._run / "pulse" / "native"

    @property
    def env(self) -> dict[str, str]:
        """Environment for client processes (capture, paplay, pactl): only the server address."""
        env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "PULSE_SERVER")}
        env["PULSE_SERVER"] = f"unix:{self.socket}"
        env["HOME"] = str(self._home)  # keeps ~/.asoundrc and cookies of the real user out
        return env

    def start(self, timeout: float = 10.0) -> None:
        self._run.mkdir(mode=0o700)
        self._home.mkdir()
        config = Path(self._dir.name) / "pa.pa"
        config.write_text(_CONFIG)
        env = {k: v for k, v in os.environ.items() if k != "PULSE_SERVER"}
        env.update(XDG_RUNTIME_DIR=str(self._run), HOME=str(self._home))
        self._proc = subprocess.Popen(
            [self._pulseaudio, "-n", "-F", str(config), "--exit-idle-time=-1",
             "--daemonize=no", f"--log-target=file:{self.log}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.socket.exists() and subprocess.run(
                    [self._pactl, "info"], env=self.env, capture_output=True,
                    check=False).returncode == 0:
                return
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = self.log.read_text()[-800:] if self.log.exists() else ""
                self.stop()
                msg = f"pulseaudio did not start: {log}"
                raise RuntimeError(msg)
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()
