"""The Prometheus rules and the Alertmanager configuration in alerts/, checked with the real tools.

- promtool (Debian package `prometheus`, 2.42): `check rules`, `check config`, `test rules`;
- amtool (Debian package `prometheus-alertmanager`): `check-config`, and where pages and tickets go;
- read statically: every alert has its labels, annotations and a runbook section in
  docs/runbooks.md; every alert and every recording rule is exercised by alerts/tests/*.yml;
  the rules only use metrics of the observability contract; alerts/shorten_for.py makes
  valid rule files with short `for:`.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "alerts"
RULE_FILES = sorted(ALERTS.glob("*.rules.yml"))
TEST_FILES = sorted((ALERTS / "tests").glob("*.yml"))
RUNBOOKS = ROOT / "docs" / "runbooks.md"
RUNBOOK_URL = "https://github.com/stablews/stablews/blob/main/docs/runbooks.md#"
SEVERITIES = {"page", "ticket"}
# Alerts whose description has no meaningful $value (absent() is always 1).
NO_VALUE_IN_DESCRIPTION = {"StablewsMetricsAbsent"}


def binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package `{package}` (apt-get install {package})",
                    pytrace=False)
    return path


def run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@cache
def groups() -> list[dict[str, Any]]:
    return [group for path in RULE_FILES for group in load(path)["groups"]]


def alerting_rules() -> list[dict[str, Any]]:
    return [rule for group in groups() for rule in group["rules"] if "alert" in rule]


def recording_rules() -> list[dict[str, Any]]:
    return [rule for group in groups() for rule in group["rules"] if "record" in rule]


def alert_names() -> list[str]:
    return sorted({rule["alert"] for rule in alerting_rules()})


@cache
def unit_tests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, test group) of every test group in alerts/tests/."""
    return [(path.name, test) for path in TEST_FILES for test in load(path)["tests"]]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {github_anchor(m) for m in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M)}


def section(name: str) -> str:
    text = RUNBOOKS.read_text()
    match = re.search(rf"^## {re.escape(name)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"docs/runbooks.md has no section '## {name}'"
    return match.group(1)


# --- the real tools ---------------------------------------------------------------------


def test_rule_files_exist():
    assert [p.name for p in RULE_FILES] == ["alerting.rules.yml", "recording.rules.yml"]
    assert TEST_FILES, "no promtool unit tests in alerts/tests/"


def test_promtool_check_rules():
    promtool = binary("promtool", "prometheus")
    result = run(promtool, "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config():
    """rule_files in prometheus.yml are relative to it: the check also loads and checks them."""
    promtool = binary("promtool", "prometheus")
    result = run(promtool, "check", "config", "alerts/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout + result.stderr


@pytest.mark.parametrize("test_file", TEST_FILES, ids=lambda p: p.name)
def test_promtool_test_rules(test_file: Path):
    promtool = binary("promtool", "prometheus")
    result = run(promtool, "test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_amtool_check_config():
    amtool = binary("amtool", "prometheus-alertmanager")
    result = run(amtool, "check-config", "alerts/alertmanager.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("labels", "receiver"), [
    (["severity=page", "alertname=StablewsInstanceDown"], "pager"),
    (["severity=ticket", "alertname=StablewsNotReady"], "ticket"),
])
def test_alertmanager_routes_pages_and_tickets(labels: list[str], receiver: str):
    amtool = binary("amtool", "prometheus-alertmanager")
    result = run(amtool, "config", "routes", "test", "--config.file=alerts/alertmanager.yml", *labels)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == [receiver]


def test_alertmanager_groups_and_inhibits():
    config = load(ALERTS / "alertmanager.yml")
    assert config["route"]["group_by"] == ["alertname", "job"]
    same_alert = [
        rule for rule in config["inhibit_rules"]
        if rule["source_matchers"] == ['severity="page"'] and rule["target_matchers"] == ['severity="ticket"']
    ]
    assert same_alert and set(same_alert[0]["equal"]) == {"alertname", "instance"}


def test_prometheus_config_for_the_compose_stack():
    config = load(ALERTS / "prometheus.yml")
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == ["*.rules.yml"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["stablews"]["static_configs"][0]["targets"] == ["stablews:8000", "stablews-2:8000"]  # both instances


# --- alerts: labels, annotations, runbooks ----------------------------------------------


def test_alert_names_and_severities():
    for rule in alerting_rules():
        assert re.fullmatch(r"Stablews[A-Z][A-Za-z0-9]+", rule["alert"]), rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, rule["alert"]
    pairs = [(rule["alert"], rule["labels"]["severity"]) for rule in alerting_rules()]
    assert len(pairs) == len(set(pairs)), "an alert name appears twice with the same severity"


def test_every_alert_has_summary_description_and_runbook_url():
    for rule in alerting_rules():
        name, annotations = rule["alert"], rule.get("annotations", {})
        assert set(annotations) >= {"summary", "description", "runbook_url"}, name
        assert "$labels.instance" in annotations["summary"] + annotations["description"], name
        if name not in NO_VALUE_IN_DESCRIPTION:
            assert "$value" in annotations["description"], name
        assert annotations["runbook_url"] == RUNBOOK_URL + name.lower(), name


def test_every_runbook_url_anchor_is_a_section_of_runbooks_md():
    existing = anchors(RUNBOOKS)
    missing = sorted({rule["annotations"]["runbook_url"].split("#", 1)[1] for rule in alerting_rules()} - existing)
    assert missing == []


@pytest.mark.parametrize("name", alert_names())
def test_every_runbook_section_says_what_how_traces_and_what_to_do(name: str):
    text = section(name)
    for part in ("**What it means.**", "**Confirm it.**", "**Find the traces.**", "**What to do.**"):
        assert part in text, f"{name}: no {part}"


def test_runbooks_has_no_section_for_an_alert_that_does_not_exist():
    text = RUNBOOKS.read_text()
    sections = set(re.findall(r"^## (Stablews\w+)$", text, flags=re.M))
    assert sections == set(alert_names())


@pytest.mark.parametrize("doc", [RUNBOOKS, ALERTS / "README.md"], ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert broken == []


# --- the unit tests cover every rule ----------------------------------------------------


def test_every_alert_fires_in_a_test_and_stays_silent_in_another():
    firing: set[tuple[str, str]] = set()
    silent: set[str] = set()
    for _, test in unit_tests():
        for case in test.get("alert_rule_test", []):
            expected = case.get("exp_alerts") or []
            if not expected:
                silent.add(case["alertname"])
            for alert in expected:
                firing.add((case["alertname"], alert["exp_labels"]["severity"]))
    every = {(rule["alert"], rule["labels"]["severity"]) for rule in alerting_rules()}
    assert sorted(every - firing) == [], "alert (and severity) never expected to fire"
    assert sorted(set(alert_names()) - silent) == [], "alert never expected to stay silent"


def test_every_recording_rule_is_tested():
    """Each recording rule is checked by a promql_expr_test, or read by an alert (all alerts are tested)."""
    tested = " ".join(case["expr"] for _, test in unit_tests() for case in test.get("promql_expr_test", []))
    used_by_alerts = " ".join(rule["expr"] for rule in alerting_rules())
    untested = [
        rule["record"] for rule in recording_rules()
        if not re.search(rf"(?<![\w:]){re.escape(rule['record'])}(?![\w:])", tested + " " + used_by_alerts)
    ]
    assert untested == []


def test_unit_tests_evaluate_recording_rules_first():
    """promtool evaluates rule groups in a random order unless the test file orders them."""
    names = [group["name"] for group in groups()]
    recording = [g["name"] for g in groups() if all("record" in r for r in g["rules"])]
    for path in TEST_FILES:
        order = load(path).get("group_eval_order", [])
        assert sorted(order) == sorted(names), f"{path.name}: group_eval_order must list every group"
        assert order[: len(recording)] == recording, f"{path.name}: recording groups first"


def test_rules_only_use_contract_metrics():
    """Every raw metric a rule reads is in the observability contract (docs/observability.md)."""
    documented = set(re.findall(r"`(stablews_[a-z_]+)`", (ROOT / "docs" / "observability.md").read_text()))
    used = set()
    for group in groups():
        for rule in group["rules"]:
            used |= set(re.findall(r"(?<![\w:])(stablews_[a-z_]+)", rule["expr"]))
    base = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}
    assert sorted(base - documented) == []


def test_recording_rules_keep_job_and_instance():
    for rule in recording_rules():
        expr = rule["expr"]
        if expr.startswith("vector("):
            continue
        for by in re.findall(r"by \(([^)]*)\)", expr):
            assert {"job", "instance"} <= {label.strip() for label in by.split(",")}, rule["record"]


# --- shorten_for.py ---------------------------------------------------------------------


def shorten_module():
    spec = importlib.util.spec_from_file_location("shorten_for", ALERTS / "shorten_for.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shorten_for_writes_valid_rules_with_short_for(tmp_path: Path):
    promtool = binary("promtool", "prometheus")
    module = shorten_module()
    before = {path: path.read_text() for path in RULE_FILES}
    assert module.main(["--for", "5s", "--out", str(tmp_path), *map(str, RULE_FILES)]) == 0
    assert {path: path.read_text() for path in RULE_FILES} == before, "the shipped rule files changed"

    rewritten = [tmp_path / path.name for path in RULE_FILES]
    for path in rewritten:
        for group in load(path)["groups"]:
            assert "interval" not in group, path.name
            for rule in group["rules"]:
                assert module.seconds(rule.get("for", "0s")) <= 5, (path.name, rule.get("alert"))
    assert len([r for p in rewritten for g in load(p)["groups"] for r in g["rules"]]) == \
        len(recording_rules()) + len(alerting_rules())
    result = run(promtool, "check", "rules", *map(str, rewritten))
    assert result.returncode == 0, result.stdout + result.stderr


def test_shorten_for_keeps_shorter_durations_and_expressions():
    module = shorten_module()
    text = (
        "groups:\n  - name: g\n    interval: 5m\n    rules:\n"
        "      - alert: A\n        expr: up == 0\n        for: 10m\n"
        "      - alert: B\n        expr: up == 1\n        for: 2s\n"
    )
    assert module.shorten(text, "5s") == text.replace("    interval: 5m\n", "").replace("for: 10m", "for: 5s")
    assert "interval: 5m" in module.shorten(text, "5s", keep_interval=True)
    assert module.seconds("1h30m") == 5400
    with pytest.raises(ValueError):
        module.seconds("soon")
