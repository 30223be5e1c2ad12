"""The compose stack: valid compose file, and every name it refers to exists."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from support.compose_model import compose_binary

FLOWLOG_SERVICES = ("scheduler", "runner", "checkpointer", "metrics")


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose(compose_dir: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = load(compose_dir / "compose.yaml")
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def test_compose_file_is_valid_against_the_compose_spec(
    compose: dict[str, Any], shared_dir: Path
) -> None:
    schema = json.loads((shared_dir / "schemas" / "compose-spec.json").read_text())
    # the schema names draft 07 by a URL jsonschema does not recognise
    jsonschema.Draft7Validator(schema).validate(compose)


def test_docker_compose_accepts_the_file(compose_dir: Path) -> None:
    result = subprocess.run(
        [str(compose_binary()), "-f", str(compose_dir / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_every_depends_on_target_is_a_service(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target in service.get("depends_on", []):
            assert target in services, f"{name} depends on unknown service {target}"


def test_every_prometheus_scrape_target_is_a_compose_service(
    compose_dir: Path, services: dict[str, dict[str, Any]]
) -> None:
    config = load(compose_dir / "prometheus.yml")
    scraped: dict[str, int] = {}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                scraped[host] = int(port)
        for dns in job.get("dns_sd_configs", []):
            for host in dns["names"]:
                scraped[host] = int(dns["port"])
    assert set(scraped) <= set(services)
    for name in FLOWLOG_SERVICES:
        port = int(services[name]["environment"]["FLOWLOG_HTTP_PORT"])
        assert scraped.get(name) == port, f"{name} is not scraped on its HTTP port {port}"


def test_flowlog_healthchecks_hit_healthz_on_the_http_port(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in FLOWLOG_SERVICES:
        service = services[name]
        assert service["command"] == ["service", name]
        probe = " ".join(service["healthcheck"]["test"])
        match = re.search(r"http://127\.0\.0\.1:(\d+)/healthz", probe)
        assert match, f"{name}: healthcheck does not request /healthz: {probe}"
        assert match.group(1) == service["environment"]["FLOWLOG_HTTP_PORT"]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["runner"]["deploy"]["replicas"] == 2


def test_every_service_url_names_a_compose_service(
    compose_dir: Path, services: dict[str, dict[str, Any]]
) -> None:
    urls = [
        services[name]["environment"][key]
        for name in FLOWLOG_SERVICES
        for key in ("FLOWLOG_REDIS_URL", "OTEL_EXPORTER_OTLP_ENDPOINT")
    ]
    datasources = load(compose_dir / "grafana/provisioning/datasources/prometheus.yaml")
    urls += [source["url"] for source in datasources["datasources"]]
    collector = load(compose_dir / "otel-collector.yaml")
    urls += [f"otlp://{exporter['endpoint']}" for exporter in collector["exporters"].values()]
    for url in urls:
        assert urlsplit(url).hostname in services, f"{url} does not name a compose service"


def test_every_mounted_path_exists_in_the_repository(
    compose_dir: Path, services: dict[str, dict[str, Any]]
) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (compose_dir / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if build is not None:
            context = compose_dir / build["context"]
            dockerfile = context / build["dockerfile"]
            assert dockerfile.is_file(), f"{name}: no {dockerfile}"
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY "):
                    for copied in line.split()[1:-1]:
                        assert (context / copied).exists(), f"Dockerfile copies missing {copied}"


def test_grafana_loads_the_dashboards_directory(
    compose_dir: Path, repo_root: Path, services: dict[str, dict[str, Any]]
) -> None:
    provider = load(compose_dir / "grafana/provisioning/dashboards/flowlog.yaml")
    path = provider["providers"][0]["options"]["path"]
    mounts = dict(volume.split(":")[:2][::-1] for volume in services["grafana"]["volumes"])
    assert (compose_dir / mounts[path]).resolve() == repo_root / "dashboards"
    datasources = load(compose_dir / "grafana/provisioning/datasources/prometheus.yaml")
    assert [source["uid"] for source in datasources["datasources"]] == ["flowlog-prometheus"]


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service["image"]
        if "build" in service:
            continue
        tag = image.rsplit(":", 1)[1] if ":" in image else ""
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: image {image} is not pinned"
