"""Command line of the transcriber. Flags override the environment variable of the same meaning."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

# flag destination -> environment variable it overrides
_FLAG_ENV = {
    "metrics_port": "METRICS_PORT",
    "inactivity_timeout": "INACTIVITY_TIMEOUT_S",
    "namespace": "EDGESCRIBE_NAMESPACE",
    "speech_model": "ASSEMBLYAI_SPEECH_MODEL",
    "log_level": "LOG_LEVEL",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="edgescribe-transcriber",
        description="Transcribe every device's audio stream with AssemblyAI v3, opening a "
                    "session only while someone speaks. Configured by environment variables "
                    "(see the README); secrets (ASSEMBLYAI_API_KEY, REDIS_URL with a password) "
                    "only by environment or files, never by flags.",
    )
    parser.add_argument("--healthcheck", action="store_true",
                        help="exit 0 if the running transcriber's /healthz answers 200")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (0 = off)")
    parser.add_argument("--inactivity-timeout", type=float, metavar="SECONDS",
                        help="silence before a session is terminated")
    parser.add_argument("--namespace", help="prefix of every Redis key")
    parser.add_argument("--speech-model", help="AssemblyAI speech_model")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def effective_env(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, str]:
    merged = dict(env)
    for dest, name in _FLAG_ENV.items():
        value = getattr(args, dest)
        if value is not None:
            merged[name] = str(value)
    return merged
