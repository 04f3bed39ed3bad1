"""Static checks of the monitoring half of deploy/: Prometheus config and alerts, the dashboard.

promtool validates the config, the rules and the alert unit tests; every dashboard query, with
Grafana's variables substituted, goes through promtool's PromQL parser as a recording rule.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "edgescribe.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"

# DESIGN §6, plus the transcriber metrics planned alongside it.
DESIGN_METRICS = {
    "capture_frames_total", "capture_frames_published_total", "capture_frames_dropped_total",
    "capture_buffered_frames", "capture_redis_up",
    "transcriber_sessions_started_total", "transcriber_sessions_ended_total",
    "transcriber_session_open", "transcriber_session_duration_seconds_bucket",
    "transcriber_session_duration_seconds_sum", "transcriber_session_duration_seconds_count",
    "transcriber_billed_seconds_total", "transcriber_speech_seconds_total",
    "transcriber_silence_seconds", "transcriber_turns_total", "transcriber_errors_total",
    "transcriber_stream_lag_seconds", "transcriber_device_owned", "transcriber_frames_total",
    "transcriber_frames_skipped_total", "transcriber_auth_failures_total",
}
GRAFANA_VARIABLES = {  # what Grafana would put in; any value PromQL accepts will do
    "$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h",
    "$price_per_hour": "0.15", "${price_per_hour}": "0.15", "$device": ".*", "${device}": ".*",
}
METRIC_NAME = re.compile(r"\b(?:capture|transcriber)_[a-z_]+\b")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True,
                          timeout=60, check=False, cwd=cwd)


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def query_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def exprs() -> list[tuple[str, str]]:
    return [(f"panel {p['id']} ({p['title']}) {t['refId']}", t["expr"])
            for p in query_panels() for t in p["targets"]]


def alert_names() -> list[str]:
    return re.findall(r"^\s+- alert: (\w+)$", (PROMETHEUS / "alerts.yml").read_text(), re.M)


# --- Prometheus ------------------------------------------------------------------------------

def test_prometheus_config_is_valid_and_finds_its_rules(tmp_path: Path) -> None:
    # From another directory: rule_files must resolve next to the config, as in the container.
    result = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(PROMETHEUS / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    text = (PROMETHEUS / "alerts_test.yml").read_text()
    cases = re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", text)
    firing = {name for name, empty in cases if not empty}
    quiet = {name for name, empty in cases if empty}
    names = set(alert_names())
    assert len(names) >= 10
    assert names == firing == quiet, {"untested firing": names - firing, "quiet": names - quiet}


def test_scrape_jobs_discover_services_through_dns() -> None:
    text = (PROMETHEUS / "prometheus.yml").read_text()
    jobs = re.findall(r'names: \["(\w+)"\]\n\s+type: A\n\s+port: (\d+)', text)
    assert dict(jobs) == {"capture": "9101", "transcriber": "9102"}


# --- metric names ----------------------------------------------------------------------------

def used_metric_names() -> set[str]:
    text = (PROMETHEUS / "alerts.yml").read_text() + "\n".join(e for _, e in exprs())
    return set(METRIC_NAME.findall(text))


def test_queries_use_only_design_metric_names() -> None:
    unknown = used_metric_names() - DESIGN_METRICS
    assert not unknown, f"not in DESIGN §6 (a typo?): {sorted(unknown)}"


def test_queries_use_metrics_the_services_define() -> None:
    """Against the services' source: each name must be declared there (as the client names it)."""
    declared = set()
    for path in itertools.chain((ROOT / "capture").rglob("*.py"),
                                (ROOT / "transcriber").rglob("*.py")):
        declared.update(re.findall(r'"((?:capture|transcriber)_[a-z_]+)"', path.read_text()))
    if not any(name.startswith("transcriber_") for name in declared):
        pytest.skip("the transcriber declares no metrics yet")

    def is_declared(name: str) -> bool:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        return bool({name, name.removesuffix("_total"), base} & declared)

    missing = sorted(name for name in used_metric_names() if not is_declared(name))
    assert not missing, f"no service declares {missing}"


# --- Grafana ---------------------------------------------------------------------------------

def provisioned_uid() -> str:
    [uid] = re.findall(r"^\s+uid: (\S+)$", DATASOURCES.read_text(), re.M)
    return uid


def test_dashboard_identity_and_datasource() -> None:
    board = dashboard()
    assert (board["uid"], board["title"]) == ("edgescribe-overview", "edgescribe")
    expected = {"type": "prometheus", "uid": provisioned_uid()}
    for panel in query_panels():
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
            assert target["expr"].strip(), panel["title"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == expected, variable["name"]


def test_dashboard_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["price_per_hour"]["query"] == "0.15"
    assert variables["price_per_hour"]["current"]["value"] == "0.15"
    device = variables["device"]
    assert (device["includeAll"], device["multi"], device["allValue"]) == (True, True, ".*")
    # Every device-labelled series follows the Device variable. Exempt: the auth counter has no
    # device label, and devices-per-replica is about replicas.
    exempt = {"transcriber_auth_failures_total", "transcriber_device_owned"}
    for where, expr in exprs():
        for name, selector in re.findall(r"((?:capture|transcriber)_[a-z_]+)(\{[^}]*\})?", expr):
            if name not in exempt:
                assert selector == '{device=~"$device"}', f"{where}: {name}{selector}"


def test_dashboard_layout() -> None:
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x, y in itertools.product(range(pos["x"], pos["x"] + pos["w"]),
                                      range(pos["y"], pos["y"] + pos["h"])):
            assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
            cells[(x, y)] = panel["title"]


def test_dashboard_rates_use_grafana_intervals() -> None:
    for where, expr in exprs():
        for window in re.findall(r"\[([^\]]*)\]", expr):
            assert window in {"$__rate_interval", "$__range"}, f"{where}: [{window}]"


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for number, (where, query) in enumerate(exprs()):
        expr = query
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: unknown variable in {query}"
        lines += [f"      - record: dashboard:query_{number}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard_rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs())} rules found" in result.stdout


def test_dashboard_provider_reads_the_mounted_directory() -> None:
    provider = (GRAFANA / "provisioning" / "dashboards" / "edgescribe.yml").read_text()
    assert re.search(r"^\s+type: file$", provider, re.M)
    [path] = re.findall(r"^\s+path: (\S+)$", provider, re.M)
    compose = (ROOT / "docker-compose.yml").read_text()
    assert f"./deploy/grafana/dashboards:{path}:ro" in compose
    assert f"GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH: {path}/{DASHBOARD.name}" in compose
    assert re.search(r"^\s+url: http://prometheus:9090$", DATASOURCES.read_text(), re.M)
