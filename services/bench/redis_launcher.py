"""A private redis-server process on a free port in its own directory.

Used by the benchmarks when no Redis URL is given, and by the test suite, which never touches
a shared server.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from eventstore.errors import FlowlogError

_START_ATTEMPTS = 5
_POLL_INTERVAL_S = 0.02


class RedisLaunchFailed(FlowlogError):
    """redis-server could not be started (binary missing, exited, or never answered PING)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server child process bound to 127.0.0.1.

    ``appendonly`` turns on the AOF (``fsync_always`` makes every write durable before it is
    acknowledged), so :meth:`restart` after :meth:`kill` brings the data back: the port and
    directory stay the same across restarts.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        fsync_always: bool = False,
        directory: Path | None = None,
        binary: str | None = None,
    ) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise RedisLaunchFailed("redis-server is not on PATH")
        self.binary = found
        self.appendonly = appendonly
        self.fsync_always = fsync_always
        self._own_directory = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="flowlog-redis-"))
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start on a free port (retrying if another process takes it first)."""
        for _ in range(_START_ATTEMPTS):
            self.port = free_port()
            if self._launch(timeout_s):
                return
        raise RedisLaunchFailed(
            f"redis-server did not start after {_START_ATTEMPTS} attempts: {self._log_tail()}"
        )

    def restart(self, timeout_s: float = 10.0) -> None:
        """Start again on the same port and directory (the AOF, if any, is loaded)."""
        if self.running:
            self.stop()
        if not self._launch(timeout_s):
            raise RedisLaunchFailed(
                f"redis-server did not restart on port {self.port}: {self._log_tail()}"
            )

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM and wait: a clean shutdown."""
        self._end(signal.SIGTERM)

    def close(self) -> None:
        """Kill the server and remove the directory if this object created it."""
        self.kill()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _arguments(self) -> list[str]:
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--save", "",
            "--logfile", "redis.log",
            "--appendonly", "yes" if self.appendonly else "no",
        ]  # fmt: skip
        if self.appendonly:
            args += ["--appendfsync", "always" if self.fsync_always else "everysec"]
        return args

    def _launch(self, timeout_s: float) -> bool:
        process = subprocess.Popen(
            self._arguments(),
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._process = process
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    return False
                try:
                    # Another process may hold the port: only our own pid counts as started.
                    if client.info("server").get("process_id") == process.pid:
                        return True
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                time.sleep(_POLL_INTERVAL_S)
        finally:
            client.close()
        self.kill()
        return False

    def _end(self, sig: signal.Signals) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
        process.wait(timeout=30)

    def _log_tail(self) -> str:
        log = self.directory / "redis.log"
        if not log.exists():
            return "no log written"
        return " | ".join(log.read_text(errors="replace").splitlines()[-5:])
