"""Servers the bench starts itself: a Kefu node (``kefu serve``) and the echo server.

Each runs as a child process with its open-file soft limit raised to the hard limit, logs
to a file in its own temporary directory, and is stopped with SIGTERM (then SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from kefu.cluster.local import free_port

STARTUP_TIMEOUT = 30.0


def _raise_nofile() -> None:  # runs in the child between fork and exec
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def kefu_command() -> list[str]:
    """The ``kefu`` entry point beside this interpreter (the venv's), else ``-m kefu``."""
    script = Path(sys.executable).with_name("kefu")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kefu"]


class ServerProcess:
    """A child server on ``127.0.0.1:port`` with a scratch directory of its own."""

    def __init__(
        self, name: str, argv: Sequence[str], port: int, env: dict[str, str], workdir: Path
    ) -> None:
        self.name = name
        self.port = port
        self.dir = workdir
        self.log_path = self.dir / "server.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                preexec_fn=_raise_nofile,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early; see {self.log_path}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1.0) as resp:
                    if resp.status == 200 and json.loads(resp.read()).get("status") == "ok":
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f}s:\n{self.tail()}")

    def metrics(self) -> str:
        """The node's Prometheus text ('' for servers without /metrics)."""
        try:
            with urllib.request.urlopen(f"{self.url}/metrics", timeout=5.0) as resp:
                return str(resp.read().decode())
        except OSError:
            return ""

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_node(secret: str, settings: dict[str, str]) -> ServerProcess:
    """``kefu serve`` on a free port with a fresh data directory; uvloop and 30 s
    heartbeats are the node's defaults and are left alone."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="kefu-bench-node-"))
    argv = [*kefu_command(), "serve", "--port", str(port), "--data-dir", str(workdir / "data")]
    for name, value in {"log_level": "WARNING", **settings}.items():
        argv += ["--set", f"{name}={value}"]
    return _started(ServerProcess("node", argv, port, {"KEFU_JWT_SECRET": secret}, workdir))


def start_echo(compress: bool) -> ServerProcess:
    """The bare aiohttp echo server (:mod:`kefu.bench.echo`) on a free port."""
    port = free_port()
    argv = [sys.executable, "-m", "kefu.bench.echo", "--port", str(port)]
    if compress:
        argv.append("--compress")
    workdir = Path(tempfile.mkdtemp(prefix="kefu-bench-echo-"))
    return _started(ServerProcess("echo", argv, port, {}, workdir))


def _started(server: ServerProcess) -> ServerProcess:
    try:
        server.wait_healthy()
    except BaseException:
        server.stop()
        raise
    return server
