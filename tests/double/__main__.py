"""Run the AssemblyAI double alone, e.g. for a benchmark or a manual run of the transcriber.

From the repository root::

    .venv/bin/python -m tests.double --port 8765 --key test-key

It prints its URL (``ws://127.0.0.1:8765/v3/ws``: use it as ``ASSEMBLYAI_URL``) and runs until
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence

from capture.common.runtime import install_stop_signals
from tests.double.config import U3, UNIVERSAL, DoubleConfig
from tests.double.server import DoubleServer


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.double",
        description="Local double of AssemblyAI Universal Streaming v3.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--key", action="append", dest="keys",
                        help="accepted API key (repeatable; default test-key)")
    parser.add_argument("--mode", choices=(U3, UNIVERSAL),
                        help="force one turn behaviour (default: follow speech_model)")
    parser.add_argument("--second-formatted-final", action="store_true",
                        help="universal mode: unformatted then formatted end of turn")
    parser.add_argument("--no-pacing", action="store_true",
                        help="accept audio faster than real time")
    parser.add_argument("--burst-allowance", type=float, default=2.0, metavar="S",
                        help="seconds audio may run ahead of real time (default 2)")
    parser.add_argument("--end-of-turn-silence-ms", type=int, default=500)
    parser.add_argument("--max-session-s", type=float, default=10800.0)
    parser.add_argument("--reject-first", type=int, default=0, metavar="N",
                        help="refuse the first N connections with --reject-code")
    parser.add_argument("--reject-code", type=int, default=3009)
    parser.add_argument("--ignore-terminate", action="store_true")
    parser.add_argument("--begin-delay", type=float, default=0.0, metavar="S")
    parser.add_argument("--lenient-audio", action="store_true",
                        help="do not mark audio that differs from espeak-ng's as 'garbled'")
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        config = DoubleConfig(
            api_keys=tuple(args.keys or ("test-key",)), mode=args.mode,
            second_formatted_final=args.second_formatted_final,
            enforce_pacing=not args.no_pacing, burst_allowance_s=args.burst_allowance,
            end_of_turn_silence_ms=args.end_of_turn_silence_ms,
            max_session_s=args.max_session_s, reject_first=args.reject_first,
            reject_code=args.reject_code, ignore_terminate=args.ignore_terminate,
            begin_delay_s=args.begin_delay, strict_audio=not args.lenient_audio,
            decode_workers=args.decode_workers,
        )
    except ValueError as exc:
        print(f"python -m tests.double: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    install_stop_signals(stop)
    with DoubleServer(config, host=args.host, port=args.port) as double:
        print(double.url, flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
