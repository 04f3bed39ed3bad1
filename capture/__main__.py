"""``python -m capture`` / ``edgescribe-capture``: parse, configure, wire, run."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry

from capture.cli import parse_args
from capture.common.logs import setup_logging
from capture.common.runtime import EXIT_OK, check_health_url, install_stop_signals, run_cli
from capture.config import CaptureSettings, metrics_port_for_healthcheck
from capture.framing import SystemClock
from capture.mic import default_pyaudio, format_device_table, list_input_devices, quiet_stderr
from capture.service import CaptureService, build_source, redis_factory_for

log = logging.getLogger("capture")


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    args = parse_args(argv)
    if args.healthcheck:
        port = metrics_port_for_healthcheck(env, args)
        return check_health_url(f"http://127.0.0.1:{port}/healthz")
    if args.list_devices:
        with quiet_stderr():
            pa = default_pyaudio()
            devices = list_input_devices(pa)
            pa.terminate()
        print(format_device_table(devices))
        return EXIT_OK

    settings = CaptureSettings.from_env(env, args)
    password = urlsplit(settings.redis_url).password
    setup_logging(settings.log_level, secrets=[password] if password else [])
    if password and args.redis_url is not None:
        log.warning("--redis-url holds a password, which every local user can read in the "
                    "process list; set REDIS_URL in the environment instead")
    stop = threading.Event()
    install_stop_signals(stop)
    clock = SystemClock()
    service = CaptureService(
        settings, source=build_source(settings, clock),
        redis_factory=redis_factory_for(settings.redis_url), registry=CollectorRegistry(),
        clock=clock, stop=stop)
    return service.run()


def run() -> None:
    run_cli(main)


if __name__ == "__main__":
    run()
