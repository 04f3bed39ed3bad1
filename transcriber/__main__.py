"""``python -m transcriber``: build the settings, the collaborators, run until SIGTERM."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry

from capture.common.env import env_int
from capture.common.errors import ConfigError
from capture.common.logs import setup_logging
from capture.common.redisconn import connect
from capture.common.runtime import (
    EXIT_OK,
    MetricsServer,
    check_health_url,
    install_stop_signals,
    run_cli,
)
from transcriber.aai.client import StreamingSession
from transcriber.aai.params import StreamingParams
from transcriber.cli import effective_env, parse_args
from transcriber.config import TranscriberSettings
from transcriber.metrics import TranscriberMetrics
from transcriber.worker import Worker

log = logging.getLogger("transcriber")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = effective_env(args, os.environ)
    if args.healthcheck:
        port = env_int(env, "METRICS_PORT", 9102, minimum=1, maximum=65535)
        return check_health_url(f"http://127.0.0.1:{port}/healthz")
    settings = TranscriberSettings.from_env(env)
    redis_password = urlsplit(settings.redis_url).password or ""
    setup_logging(settings.log_level, secrets=[settings.api_key, redis_password])

    params = StreamingParams(speech_model=settings.speech_model,
                             format_turns=settings.format_turns,
                             keyterms_prompt=settings.keyterms)

    def open_session() -> StreamingSession:
        return StreamingSession(settings.aai_url, settings.api_key, params)

    registry = CollectorRegistry()
    worker = Worker(settings, client=connect(settings.redis_url),
                    metrics=TranscriberMetrics.create(registry), open_session=open_session)
    server = None
    if settings.metrics_port:
        server = MetricsServer(registry, worker.health, settings.metrics_host,
                               settings.metrics_port)
        try:
            server.start()
        except OSError as exc:
            raise ConfigError("METRICS_PORT", f"cannot listen on {settings.metrics_port}: "
                              f"{exc.strerror}") from None
    stop = threading.Event()
    install_stop_signals(stop)
    worker.start()
    while not stop.wait(1.0):
        pass
    worker.stop()
    if server is not None:
        server.stop()
    return EXIT_OK


def run() -> None:
    run_cli(main)


if __name__ == "__main__":
    run()
