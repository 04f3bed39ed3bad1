"""The whole stack on this host: compose's capture-replay and transcriber, Redis, Prometheus with
the shipped alert rules, the AssemblyAI double; every dashboard query must return data.

The two services run with the command and environment ``docker compose config`` renders, and
only what cannot hold outside a container is changed (printed: run with ``-s`` to see it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from capture.contract import Keys
from tests.double import DoubleConfig, DoubleServer
from tests.support.redisserver import RedisServer, free_port
from tests.support.speech import compose, digits_phrase, write_wav
from tests.support.stack import (
    Prometheus,
    ServiceProcess,
    alert_groups,
    derive_prometheus_config,
    host_service,
    substitute,
)
from tests.support.tools import require_tool
from tests.support.transcribing import digits_of
from tests.test_deploy_monitoring import exprs
from tests.test_deploy_static import DOCKERFILE, GRAFANA_PASSWORD, REDIS_PASSWORD, ROOT, render
from transcriber.records import SessionRecord, TurnRecord

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
INACTIVITY_TIMEOUT_S = "1"  # compose passes ${INACTIVITY_TIMEOUT_S} on: set through .env
FIRST, SECOND = [1, 2, 3, 4], [5, 6, 7, 8]
REPLAY_WAV = "/audio/speech.wav"  # compose's default REPLAY_FILE under its ./audio mount
API_KEY = "test-key"  # the double's
StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]


def make_env_file(tmp: Path) -> Path:
    """The static tests' .env (the two required passwords, a secrets dir) plus the timeout."""
    secrets = tmp / "secrets"
    secrets.mkdir()
    (secrets / "assemblyai_api_key").write_text(API_KEY)
    path = tmp / "test.env"
    path.write_text(f"REDIS_PASSWORD={REDIS_PASSWORD}\nGRAFANA_ADMIN_PASSWORD={GRAFANA_PASSWORD}\n"
                    f"SECRETS_DIR={secrets}\nINACTIVITY_TIMEOUT_S={INACTIVITY_TIMEOUT_S}\n")
    return path


def wait_for(what: str, predicate: Callable[[], bool], timeout: float,
             tick: Callable[[], None] = lambda: None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        tick()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def grafana_variables(elapsed_s: float) -> dict[str, str]:
    """What Grafana puts in, for a time range covering this test. The device variable is at
    its default, All, whose value the dashboard sets to the regex ``.*``."""
    return {
        "$__rate_interval": "15s", "$__interval": "1s",
        "$__range": f"{math.ceil(elapsed_s)}s",
        "$price_per_hour": "0.15", "${price_per_hour}": "0.15",
        "$device": ".*", "${device}": ".*",
    }


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_stack_end_to_end_and_every_panel_has_data(tmp_path: Path) -> None:
    tmp = tmp_path
    started = time.monotonic()
    prometheus_bin = require_tool("prometheus")
    redis_bin = require_tool("redis-server")

    config = render(tmp, make_env_file(tmp))
    wav = write_wav(tmp / "speech.wav", compose(
        1.5, digits_phrase(FIRST), 3.5, digits_phrase(SECOND), 1.0))

    with ExitStack() as stack:
        # Compose's Redis requires REDIS_PASSWORD; so does this one, so the URL stays as is.
        # (Set once it runs: RedisServer.start() waits for a PING that a password would stop.)
        server = RedisServer(redis_bin)
        stack.callback(server.close)  # before start(): a failed start leaves the child running
        server.start()
        admin = server.client()
        admin.config_set("requirepass", REDIS_PASSWORD)
        admin.close()
        double = stack.enter_context(DoubleServer(DoubleConfig(api_keys=(API_KEY,))))

        ports = {"capture": free_port(), "transcriber": free_port(), "prometheus": free_port()}
        services = {
            "capture-replay": host_service(
                config, "capture-replay", DOCKERFILE, redis_port=server.port,
                metrics_port=ports["capture"], paths={REPLAY_WAV: wav}),
            "transcriber": host_service(
                config, "transcriber", DOCKERFILE, redis_port=server.port,
                metrics_port=ports["transcriber"], aai_url=double.url),
        }
        print("\nsubstituted (everything else is compose's):")
        for service in services.values():
            print("  " + "\n  ".join(service.substituted))
        assert services["transcriber"].env["INACTIVITY_TIMEOUT_S"] == INACTIVITY_TIMEOUT_S
        client = redis.Redis.from_url(services["transcriber"].env["REDIS_URL"], socket_timeout=5)
        stack.callback(client.close)
        keys = Keys(services["transcriber"].env["EDGESCRIBE_NAMESPACE"])

        prom_config = tmp / "prometheus.yml"
        prom_config.write_text(derive_prometheus_config(
            (PROMETHEUS_DIR / "prometheus.yml").read_text(), rules_dir=PROMETHEUS_DIR,
            targets={job: [f"127.0.0.1:{port}"] for job, port in ports.items()}))
        prometheus = Prometheus(prometheus_bin, prom_config, tmp / "tsdb", ports["prometheus"])
        prometheus.start()
        stack.callback(prometheus.stop)

        transcriber = ServiceProcess(services["transcriber"], tmp)
        capture = ServiceProcess(services["capture-replay"], tmp)
        processes = [transcriber, capture]
        # Unwound last to first: capture (its end-of-stream), the transcriber, then the logs.
        stack.callback(lambda: stack_logs(processes, prometheus))
        stack.callback(transcriber.stop)
        stack.callback(capture.stop)
        transcriber.start()

        def supervise() -> None:
            for process in processes:
                process.supervise()

        # Scrapes run before capture starts, as with a long-running Prometheus: the device's
        # series, zeroed when the transcriber adopts it, are scraped in the 1.5 s before the
        # first word, so increase() over the range counts the first session too.
        wait_for("the first scrape of the transcriber",
                 lambda: prometheus.value('up{job="transcriber"}') == 1, 20, supervise)
        capture.start()

        def entries(key: str) -> list[dict[bytes, bytes]]:
            return [fields for _, fields in cast(StreamEntries, client.xrange(key))]

        def ended_sessions() -> list[SessionRecord]:
            return [SessionRecord.from_fields(f) for f in entries(keys.sessions)]

        def final_turns() -> list[TurnRecord]:
            return [t for t in map(TurnRecord.from_fields, entries(keys.turns)) if t.final]

        def first_session_done() -> bool:
            sessions = ended_sessions()
            return bool(sessions) and any(t.session == sessions[0].session
                                          for t in final_turns())

        wait_for("a session to open, end and publish its turns", first_session_done, 25,
                 supervise)
        first = ended_sessions()[0]
        assert first.reason.value == "inactivity", first
        assert first.device == services["capture-replay"].env["DEVICE_ID"]
        texts = [t.text for t in final_turns() if t.session == first.session]
        assert [d for text in texts for d in digits_of(text)] == FIRST, texts

        wait_for("Prometheus to see the ended session and its turns", lambda: (
            (prometheus.value('sum(transcriber_sessions_ended_total{reason="inactivity"})')
             or 0) >= 1
            and (prometheus.value('sum(transcriber_turns_total{final="1"})') or 0) >= 1),
            10, supervise)

        # --- every target up (a replay restarting at the end of its file may miss a scrape)
        def targets() -> list[dict[str, Any]]:
            return list(prometheus.api("targets", state="active")["activeTargets"])

        wait_for("every target to be up",
                 lambda: all(t["health"] == "up" for t in targets()), 10, supervise)
        jobs = sorted(t["labels"]["job"] for t in targets())
        assert jobs == ["capture", "prometheus", "transcriber"], jobs

        # --- the shipped alert rules loaded and evaluate without error
        expected = alert_groups((PROMETHEUS_DIR / "alerts.yml").read_text())

        def rule_groups() -> dict[str, list[dict[str, Any]]]:
            return {g["name"]: g["rules"] for g in prometheus.api("rules")["groups"]}

        wait_for("every rule to be evaluated",
                 lambda: all(r["health"] != "unknown"
                             for rules in rule_groups().values() for r in rules), 10, supervise)
        loaded = rule_groups()
        assert {name: [r["name"] for r in rules] for name, rules in loaded.items()} == expected
        broken = {r["name"]: r.get("lastError") for rules in loaded.values() for r in rules
                  if r["health"] != "ok"}
        assert not broken, broken
        alerting = {r["name"]: r["state"] for rules in loaded.values() for r in rules
                    if r["state"] != "inactive"}
        assert not alerting, f"alerts pending or firing in a healthy stack: {alerting}"

        # --- every dashboard query returns data
        variables = grafana_variables(time.monotonic() - started)
        no_data, checked = [], 0
        for where, query in exprs():
            expr = substitute(query, variables)
            result = prometheus.query(expr)
            checked += 1
            # Grafana shows NaN as a number, but it says as little as "No data".
            if not result:
                no_data.append(f"{where}: no series: {expr}")
            elif any(math.isnan(float(series["value"][1])) for series in result):
                no_data.append(f"{where}: NaN: {expr}")
        assert not no_data, "dashboard queries without data:\n" + "\n".join(no_data)

        supervise()
        assert transcriber.restarts == 0, transcriber.exit_codes
        assert set(capture.exit_codes) <= {0}, capture.exit_codes  # clean ends of the file
        sessions, turns = ended_sessions(), final_turns()
        print(f"targets up: {', '.join(jobs)}; rules: {sum(map(len, expected.values()))} in "
              f"{len(expected)} groups; panel queries checked: {checked}; sessions ended: "
              f"{len(sessions)} (double saw {len(double.sessions())}); final turns: {len(turns)} "
              f"{[t.text for t in turns]}; capture restarts: {capture.restarts}; "
              f"{time.monotonic() - started:.1f} s")


def stack_logs(processes: list[ServiceProcess], prometheus: Prometheus) -> None:
    """Printed at teardown: pytest shows it when the test fails."""
    for process in processes:
        print(process.log_tail())
    print(prometheus.log_tail(10))
