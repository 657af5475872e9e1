"""The daemon as a real process with its HTTP stage on a free loopback port, for the HTTP
tests: started with stdin as its audio source, fed silence at real time (a quiet room: a
stream that stops delivering is a problem readiness reports), so it runs until stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any

import httpx

from tests.broker import free_port
from tests.conftest import SUITE_SETTINGS, SilenceFeeder, run_daemon

TOKEN = "test-token-5f2a"
SPEAKERS_CONFIG = """
[speakers]
enabled = true
"""


class HttpDaemon:
    """`meraudiod run --source stdin` with `[http]` enabled; `url` is where it serves."""

    def __init__(
        self,
        env: dict[str, str],
        config: str = "",
        token: str | None = TOKEN,
        as_user: bool = False,
    ) -> None:
        self.env = env
        self.as_user = as_user  # without root's right to write anything (AS_A_USER)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        lines = ["[http]", "enabled = true", f"port = {self.port}", "allow_admin_commands = true"]
        if token:
            lines.append(f'token = "{token}"')
        Path(env["MERAUDIOD_CONFIG"]).write_text("\n".join(lines) + "\n" + config)
        self.log_path = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]).parent / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._feeder: SilenceFeeder | None = None

    @property
    def headers(self) -> dict[str, str]:
        """The bearer header (none without a token)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client for this daemon, with the token."""
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60, **kwargs)

    def start(self, timeout_s: float = 180) -> HttpDaemon:
        """Start and wait until /health/ready answers 200 (models loaded)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = run_daemon(
            self.env, stdout=self._log, stderr=subprocess.STDOUT, as_user=self.as_user
        )
        self._feeder = SilenceFeeder(self.proc, block_s=0.1).start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health/ready", headers=self.headers).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"daemon not ready in {timeout_s} s:\n{self.log()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 60) -> int:
        """Send a signal and wait for the process to end; returns its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout_s)
        if self._feeder is not None:
            self._feeder.stop()
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):  # silence it could not take
                self.proc.stdin.close()
        if self._log is not None:
            self._log.close()
        return code

    def log(self) -> str:
        """What the daemon logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_task(client: httpx.Client, task_id: str, want: str, timeout_s: float = 300) -> Any:
    """Poll a task until it reaches `want` (or completed/failed); returns its last body."""
    deadline = time.monotonic() + timeout_s
    body: Any = None
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/tasks/{task_id}").json()
        if body["status"] in (want, "completed", "failed"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} not {want} in {timeout_s} s: {body}")


def daemon_env(folder: Path, models_dir: Path) -> dict[str, str]:
    """The environment of a daemon with its own data directory (a module's daemon cannot use
    the function-scoped `env` fixture)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.toml"
    config.write_text("")
    base = {k: v for k, v in os.environ.items() if not k.startswith("MERAUDIOD_")}
    return {
        **base,
        "MERAUDIOD_CONFIG": str(config),
        "MERAUDIOD_STORAGE__DATA_DIR": str(folder / "data"),
        "MERAUDIOD_STORAGE__MODELS_DIR": str(models_dir),
        **SUITE_SETTINGS,
    }


def json_error(response: httpx.Response, status: int, code: str) -> str:
    """The one error shape; returns its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "request_id"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    return str(body["error"]["message"])
