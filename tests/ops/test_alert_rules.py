"""Alert rules: promtool accepts them, their unit tests pass, and they use exported metrics."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from support.prometheus import promtool

METRIC = re.compile(r"\bflowlog_[a-z0-9_]+")


def test_promtool_checks_the_rules(compose_dir: Path) -> None:
    result = promtool("check", "rules", str(compose_dir / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_rules_pass(compose_dir: Path) -> None:
    result = promtool("test", "rules", str(compose_dir / "alerts.test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_prometheus_config_with_its_rules(
    compose_dir: Path, tmp_path: Path
) -> None:
    config: dict[str, Any] = yaml.safe_load((compose_dir / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(compose_dir / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_use_only_exported_metrics(compose_dir: Path, exported_names: frozenset[str]) -> None:
    rules = yaml.safe_load((compose_dir / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            names = set(METRIC.findall(rule["expr"]))
            assert names <= exported_names, f"{rule['alert']} uses {names - exported_names}"
