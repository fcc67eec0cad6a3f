"""Run a Kefu node as a real process (for kill/restart tests)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from tests.conftest import SECRET


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NodeProcess:
    """``python -m kefu serve`` on a fixed port and data dir; start, kill, restart."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *settings: str,
        node_id: str | None = None,
        log_level: str = "WARNING",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.settings = settings
        #: ``--node-id`` (default ``proc-PORT``), the node's log level and extra environment.
        self.node_id = node_id or f"proc-{self.port}"
        self.log_level = log_level
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"node-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 20.0) -> None:
        env = dict(os.environ, KEFU_JWT_SECRET=SECRET, KEFU_LOG_LEVEL=self.log_level)
        env.update(self.env)
        args = [
            sys.executable,
            "-m",
            "kefu",
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--node-id",
            self.node_id,
        ]
        for setting in self.settings:
            args += ["--set", setting]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"node exited: {self.log.read_text()[-2000:]}")
                try:
                    async with http.get(f"{self.url}/ready") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError("node did not become ready")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no drain, no clean-up (presence and membership are left to expire)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM (the graceful drain); the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
