"""flowlog processes for tests: services and CLI commands run as real OS processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec

from services.bench.redis_launcher import free_port

REPO = Path(__file__).resolve().parents[2]


class Cluster:
    """Environment shared by the flowlog processes of one test (same Redis, same prefix)."""

    def __init__(self, redis_url: str, workdir: Path, **settings: str) -> None:
        self.redis_url = redis_url
        self.workdir = workdir
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.env: dict[str, str] = {
            **os.environ,
            "FLOWLOG_REDIS_URL": redis_url,
            "FLOWLOG_STORE__PREFIX": self.prefix,
            "FLOWLOG_STORE__PARTITIONS": "4",
            "FLOWLOG_HTTP_HOST": "127.0.0.1",
            "FLOWLOG_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            **settings,
        }
        self.processes: list[ServiceProcess] = []

    def start(self, name: str, **extra: str) -> ServiceProcess:
        index = len(self.processes)
        env = {
            **self.env,
            "FLOWLOG_HTTP_PORT": str(free_port()),
            "FLOWLOG_INSTANCE": f"{name}-{index}",
            "FLOWLOG_STORE__SPOOL_PATH": str(self.workdir / f"spool-{name}-{index}.log"),
            **extra,
        }
        proc = ServiceProcess(name, env, self.workdir / f"{name}-{index}.log")
        self.processes.append(proc)
        proc.wait_ready()
        return proc

    def cli(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``flowlog ARGS`` to completion."""
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"flowlog {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
            )
        return done

    def cli_json(self, *args: str, check: bool = True) -> Any:
        done = self.cli(*args, "-o", "json", check=check)
        return msgspec.json.decode(done.stdout.strip().splitlines()[-1])

    def stop_all(self) -> None:
        for proc in self.processes:
            proc.stop()


class ServiceProcess:
    """``flowlog service NAME`` as a child process with its log in a file."""

    def __init__(self, name: str, env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.port = int(env["FLOWLOG_HTTP_PORT"])
        self.instance = env["FLOWLOG_INSTANCE"]
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "service", name],
            env=dict(env),
            cwd=log_path.parent,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 30) -> None:
        """Poll /readyz until it answers 200 (the process exiting first is a failure)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.popen.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready after {timeout_s}s:\n{self.log()}")

    def metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=5).text

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout_s: float = 30) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self._log.close()
        return self.popen.returncode


@contextmanager
def cluster(
    redis_url: str, workdir: Path, services: Sequence[str] = (), **settings: str
) -> Iterator[Cluster]:
    c = Cluster(redis_url, workdir, **settings)
    try:
        for name in services:
            c.start(name)
        yield c
    finally:
        c.stop_all()
