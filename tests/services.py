"""Throwaway Redis and PostgreSQL servers for tests: start, kill (SIGKILL), stop, restart.

Every server is a real ``redis-server`` / ``postgres`` process of this test run, on a free
127.0.0.1 port with its own temporary directory; nothing here ever talks to the machine's
own services (6379, 5432). Debian's ``redis-server`` and ``postgresql`` packages are
installed on first use when the binaries are missing (``apt-get``, with ``sudo`` unless
root). ``initdb`` and ``postgres`` refuse to run as root: as root they run as the
``postgres`` system user (created when missing).

Loaded as a pytest plugin by ``tests/conftest.py``; the fixtures:

- ``redis_server``, ``redis_cluster``, ``postgres_server`` (session): shared servers;
- ``redis_url`` (function): the shared Redis, emptied with FLUSHALL first;
- ``postgres_url`` (function): a new empty database on the shared PostgreSQL;
- ``private_redis``, ``private_redis_cluster``, ``private_postgres`` (function): servers of
  the test's own, to kill and restart at will.

Servers still running at interpreter exit are killed (``atexit``); servers started from the
main thread also die with the test run if it is SIGKILLed (``setpriv --pdeathsig``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
import redis
from redis.crc import key_slot

from kefu.cluster.local import postgres_bindir
from tests.process import free_port

HOST = "127.0.0.1"
CLUSTER_SLOTS = 16384
POSTGRES_USER = "postgres"  # the system user the server runs as when we are root
POSTGRES_DB = "kefu"


# --- installation -----------------------------------------------------------------------


def _apt_install(*packages: str) -> None:
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    apt = [*prefix, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
    subprocess.run([*apt, "update", "-qq"], check=True)
    subprocess.run([*apt, "install", "-y", "-qq", *packages], check=True)


_install_lock = threading.Lock()


@functools.cache
def ensure_redis_installed() -> str:
    """The path of ``redis-server``; installs Debian's package when it is missing."""
    with _install_lock:
        if shutil.which("redis-server") is None:
            _apt_install("redis-server")
        path = shutil.which("redis-server")
        if path is None:
            raise RuntimeError("redis-server is missing and could not be installed")
        return path


@functools.cache
def ensure_postgres_installed() -> Path:
    """The directory of ``initdb`` and ``postgres``; installs Debian's ``postgresql``
    package when they are missing."""
    with _install_lock:
        if postgres_bindir() is None:
            _apt_install("postgresql")
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("initdb/postgres are missing and could not be installed")
        return bindir


def ensure_installed() -> None:
    ensure_redis_installed()
    ensure_postgres_installed()


def _postgres_tool(name: str) -> str:
    """A client tool (psql, pg_isready) from the server's bin dir, else from PATH."""
    candidate = ensure_postgres_installed() / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found")
    return found


# --- processes --------------------------------------------------------------------------

_live: set[_Service] = set()
_live_lock = threading.Lock()


def _pdeathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL --``: the server dies with the test run even when that is
    SIGKILLed. Only from the main thread: the signal fires when the *thread* that started
    the server ends, and only the main thread lives as long as the process."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"]


def _group_alive(pgid: int) -> bool:
    """Whether a process (other than a zombie) of process group ``pgid`` still exists."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""


class _Service:
    """One server process in its own process group, output appended to ``log``."""

    def __init__(self, directory: Path, log: Path) -> None:
        self.dir = directory
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._closed = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self, args: Sequence[str], *, as_user: str | None = None) -> None:
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        ids: dict[str, Any] = {}
        if as_user is not None:
            entry = pwd.getpwnam(as_user)
            ids = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*_pdeathsig_prefix(), *args],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,
                **ids,
            )
        with _live_lock:
            _live.add(self)

    def _check_alive(self, what: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {self.proc.returncode}; log {self.log}:\n{_tail(self.log)}"
            )

    def _reap(self, timeout: float = 10.0) -> None:
        """Wait until the server and every process of its group are gone."""
        assert self.proc is not None
        self.proc.wait(timeout)
        deadline = time.monotonic() + timeout
        while _group_alive(self.proc.pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes of group {self.proc.pid} outlived the server")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL the server and all its children (its whole process group)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._reap()

    def _stop(self, sig: signal.Signals, timeout: float) -> None:
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reap()

    def _discard(self) -> None:
        """End the server for good, quickly (its data is about to be removed)."""
        self.kill()

    def close(self) -> None:
        """Kill the server (if running) and remove its directory; idempotent."""
        if self._closed:
            return
        try:
            if self.running:
                self._discard()
        finally:
            self._closed = True
            with _live_lock:
                _live.discard(self)
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    with _live_lock:
        services = list(_live)
    for service in services:
        with contextlib.suppress(Exception):
            service.close()
    if _pg_template is not None:
        shutil.rmtree(_pg_template, ignore_errors=True)


# --- Redis ------------------------------------------------------------------------------


class RedisReplyError(Exception):
    """An error reply from Redis, as ``Kind: message`` (``MovedError: 866 127.0.0.1:7001``)."""


def redis_command(port: int, *args: str | int, timeout: float = 5.0) -> Any:
    """Send one command to the Redis on ``127.0.0.1:port`` (a fresh connection, redis-py's
    without the client's reply parsing) and return the reply: str, int, None or a list;
    error replies raise :class:`RedisReplyError`, a socket error its own ``OSError``."""
    conn = redis.Connection(
        host=HOST,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=True,
    )
    try:
        conn.send_command(*args)
        return conn.read_response()
    except redis.ResponseError as exc:
        raise RedisReplyError(f"{type(exc).__name__}: {exc}") from exc
    except redis.RedisError as exc:  # refused, reset, timed out, still loading
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from exc  # the socket's own error (ConnectionRefusedError, ...)
        raise ConnectionError(f"redis 127.0.0.1:{port}: {exc}") from exc
    finally:
        conn.disconnect()


class RedisServer(_Service):
    """``redis-server`` on 127.0.0.1:<free port> with a temporary directory.

    No persistence unless ``appendonly=True`` (``--save ""`` always): after ``kill()`` and
    ``restart()`` the data is gone. ``restart()`` keeps the port and the directory.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        appendonly: bool = False,
        cluster: bool = False,
        cluster_node_timeout_ms: int = 2000,
        extra_args: Sequence[str] = (),
        directory: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        # A cluster node's bus port: chosen here (not port + 10000) and kept across restarts.
        self.bus_port: int | None = free_port() if cluster else None
        if self.bus_port is not None:
            self.extra_args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(self.bus_port),
                "--cluster-node-timeout", str(cluster_node_timeout_ms),
                *self.extra_args,
            ]  # fmt: skip
        directory = directory or Path(tempfile.mkdtemp(prefix=f"kefu-redis-{self.port}-"))
        super().__init__(directory, directory / "redis.log")

    def __repr__(self) -> str:
        return f"RedisServer({HOST}:{self.port})"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def command(self, *args: str | int, timeout: float = 5.0) -> Any:
        return redis_command(self.port, *args, timeout=timeout)

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and wait until it answers PING (loading done)."""
        args = [
            ensure_redis_installed(),
            "--bind", HOST,
            "--port", str(self.port),
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--logfile", "",
            "--loglevel", "warning",
            *self.extra_args,
        ]  # fmt: skip
        self._spawn(args)
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(repr(self))
            try:
                if self.command("PING", timeout=1.0) == "PONG":
                    return
            except (OSError, RedisReplyError):  # not listening yet, or -LOADING
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"{self!r} did not answer PING:\n{_tail(self.log)}")
            time.sleep(0.01)

    def stop(self, timeout: float = 20.0) -> None:
        """Graceful shutdown (SIGTERM; the AOF is flushed when enabled)."""
        self._stop(signal.SIGTERM, timeout)

    def restart(self, timeout: float = 20.0) -> None:
        """Stop gracefully if running, then start again on the same port and directory."""
        self.stop()
        self.start(timeout)

    def flushall(self) -> None:
        self.command("FLUSHALL")


def _cluster_info(port: int) -> dict[str, str]:
    text = redis_command(port, "CLUSTER", "INFO", timeout=1.0)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


class RedisClusterServers:
    """``size`` Redis cluster masters (no replicas), the slots split evenly among them.

    Each node has its own port, cluster bus port, directory and ``nodes.conf``, so a node
    killed or stopped and then restarted rejoins with its slots (but, without
    ``appendonly``, none of its keys). Needs Redis >= 7.0 (``cluster-port``).
    """

    def __init__(
        self, size: int = 3, *, node_timeout_ms: int = 2000, appendonly: bool = False
    ) -> None:
        self.nodes = [
            RedisServer(
                appendonly=appendonly, cluster=True, cluster_node_timeout_ms=node_timeout_ms
            )
            for _ in range(size)
        ]
        self._formed = False

    def __repr__(self) -> str:
        return f"RedisClusterServers({self.url})"

    @property
    def seeds(self) -> list[tuple[str, int]]:
        return [(HOST, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:P1,127.0.0.1:P2,...``: every node as a seed."""
        return "redis://" + ",".join(f"{host}:{port}" for host, port in self.seeds)

    def slot_range(self, index: int) -> tuple[int, int]:
        """The first and last slot (inclusive) served by node ``index``."""
        size = len(self.nodes)
        return CLUSTER_SLOTS * index // size, CLUSTER_SLOTS * (index + 1) // size - 1

    def node_for_key(self, key: str) -> int:
        """The index of the node serving ``key``'s slot (hash tags respected)."""
        slot = key_slot(key.encode())
        return next(i for i in range(len(self.nodes)) if slot <= self.slot_range(i)[1])

    def start(self, timeout: float = 30.0) -> None:
        """Start every node, assign the slots, join them; wait for cluster_state:ok."""
        for node in self.nodes:
            if not node.running:
                node.start()
        if not self._formed:  # later starts rejoin from each node's nodes.conf
            for index, node in enumerate(self.nodes):
                node.command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
                node.command("CLUSTER", "ADDSLOTSRANGE", *self.slot_range(index))
            for node in self.nodes[1:]:
                self.nodes[0].command("CLUSTER", "MEET", HOST, node.port, node.bus_port or 0)
            self._formed = True
        self.wait_ok(timeout)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every node says cluster_state:ok and knows all the others (all must
        be running: a killed or stopped node raises)."""
        deadline = time.monotonic() + timeout
        size = str(len(self.nodes))
        while True:
            pending = []
            for index, node in enumerate(self.nodes):
                node._check_alive(f"cluster node {index}")
                try:
                    info = _cluster_info(node.port)
                except (OSError, RedisReplyError):
                    pending.append(index)
                    continue
                if info.get("cluster_state") != "ok" or info.get("cluster_known_nodes") != size:
                    pending.append(index)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self!r}: nodes {pending} not cluster_state:ok")
            time.sleep(0.05)

    def kill(self, index: int) -> None:
        """SIGKILL node ``index``."""
        self.nodes[index].kill()

    def stop(self, index: int) -> None:
        """Shut node ``index`` down gracefully."""
        self.nodes[index].stop()

    def restart(self, index: int, *, wait: bool = True, timeout: float = 30.0) -> None:
        """(Stop and) start node ``index`` on its port and directory; by default wait until
        the whole cluster is ok again (a restarted master waits ~2 s before it says ok)."""
        self.nodes[index].restart()
        if wait:
            self.wait_ok(timeout)

    def stop_all(self) -> None:
        for node in self.nodes:
            node.stop()

    def flushall(self) -> None:
        for node in self.nodes:
            if node.running:
                node.flushall()

    def close(self) -> None:
        """Kill every node and remove the directories; idempotent."""
        for node in self.nodes:
            node.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- PostgreSQL -------------------------------------------------------------------------

_pg_template: Path | None = None
_pg_template_lock = threading.Lock()


def _as_root() -> bool:
    return os.geteuid() == 0


def _server_user() -> str | None:
    """The user to run initdb/postgres as: ``postgres`` (created if missing) when root."""
    if not _as_root():
        return None
    try:
        pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", POSTGRES_USER],
            check=True,
        )
    return POSTGRES_USER


def _server_dir(prefix: str) -> Path:
    """A new temporary directory the server's user owns (mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    user = _server_user()
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def _template_datadir() -> Path:
    """A data directory made by ``initdb`` once per test run; servers start from copies."""
    global _pg_template
    with _pg_template_lock:
        if _pg_template is None:
            root = _server_dir("kefu-pg-template-")
            log = root / "initdb.log"
            args = [
                str(ensure_postgres_installed() / "initdb"),
                "--pgdata", str(root / "data"),
                "--username", "postgres",
                "--auth", "trust",
                "--encoding", "UTF8",
                "--locale", "C",
                "--no-sync",
            ]  # fmt: skip
            user = _server_user()
            ids: dict[str, Any] = {}
            if user is not None:
                entry = pwd.getpwnam(user)
                ids = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            with log.open("ab") as out:
                done = subprocess.run(
                    args, cwd=root, stdout=out, stderr=subprocess.STDOUT, check=False, **ids
                )
            if done.returncode != 0:
                text = _tail(log)
                shutil.rmtree(root, ignore_errors=True)
                raise RuntimeError(f"initdb failed ({done.returncode}):\n{text}")
            _pg_template = root
        return _pg_template / "data"


def _client_env() -> dict[str, str]:
    """The environment for psql/pg_isready, without PG* variables that could redirect them."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


class PostgresServer(_Service):
    """``postgres`` on 127.0.0.1:<free port>, its data and unix socket in a temporary
    directory; trust auth for user ``postgres``; fsync on (durability tests).

    The database ``kefu`` is created on the first start. ``kill()`` SIGKILLs the postmaster
    and all its children; ``restart()`` then runs crash recovery on the same directory.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        database: str = POSTGRES_DB,
    ) -> None:
        self.port = port or free_port()
        self.database = database
        self.settings = {
            "fsync": "on",
            "synchronous_commit": "on",
            "shared_buffers": "16MB",
            "max_connections": "100",
            "jit": "off",
            "huge_pages": "off",
            "lc_messages": "C",
            "log_min_messages": "warning",
            "cluster_name": f"kefu-test-{self.port}",
            **(settings or {}),
        }
        self._created = False
        self._retired: list[str] = []
        directory = _server_dir(f"kefu-pg-{self.port}-")
        super().__init__(directory, directory / "postgres.log")

    def __repr__(self) -> str:
        return f"PostgresServer({HOST}:{self.port})"

    @property
    def datadir(self) -> Path:
        return self.dir / "data"

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/{database}"

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/kefu``."""
        return self.dsn(self.database)

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (a copy of the template data dir the first time) and wait until
        it accepts connections (after crash recovery, if any)."""
        if not self.datadir.exists():
            subprocess.run(["cp", "-a", str(_template_datadir()), str(self.datadir)], check=True)
        args = [
            str(ensure_postgres_installed() / "postgres"),
            "-D", str(self.datadir),
            "-h", HOST,
            "-p", str(self.port),
            "-k", str(self.dir),
        ]  # fmt: skip
        for key, value in self.settings.items():
            args += ["-c", f"{key}={value}"]
        self._spawn(args, as_user=_server_user())
        deadline = time.monotonic() + timeout
        ready = [_postgres_tool("pg_isready"), "-q", "-h", HOST, "-p", str(self.port)]
        ready += ["-U", "postgres", "-d", "postgres", "-t", "1"]
        while True:
            self._check_alive(repr(self))
            if subprocess.run(ready, env=_client_env(), check=False).returncode == 0:
                break
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"{self!r} did not accept connections:\n{_tail(self.log)}")
            time.sleep(0.02)
        if not self._created:
            self.create_database(self.database)
            self._created = True

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT): sessions are ended, a checkpoint is written."""
        self._stop(signal.SIGINT, timeout)

    def _discard(self) -> None:
        # Immediate shutdown (SIGQUIT): the postmaster ends and reaps its children itself,
        # so none is left for init to reap; SIGKILL of the group if it takes too long.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._stop(signal.SIGQUIT, 5.0)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop (fast) if running, then start again on the same port and data directory."""
        self.stop()
        self.start(timeout)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with psql over TCP; return the unaligned, tuples-only output."""
        args = [_postgres_tool("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        args += ["-d", self.dsn(database), "-c", sql]
        done = subprocess.run(args, env=_client_env(), capture_output=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.decode(errors='replace')}")
        return done.stdout.decode().strip()

    def create_database(self, name: str) -> str:
        """Create an empty database ``name``; return its URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"not a plain database name: {name!r}")
        self.psql(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def fresh_database(self, name: str | None = None) -> str:
        """A new empty database (``name`` or a unique one); its URL. Databases retired with
        :meth:`retire_database` are dropped first."""
        while self._retired:
            self.drop_database(self._retired.pop())
        return self.create_database(name or f"test_{uuid.uuid4().hex[:16]}")

    def retire_database(self, name: str) -> None:
        """Have the next :meth:`fresh_database` drop ``name``: dropping it right away would
        wait (in 100 ms steps) for the backends of just-closed connections to exit."""
        self._retired.append(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, ending its sessions first."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"not a plain database name: {name!r}")
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A Redis shared by the whole run (no persistence). Don't kill it: use private_redis."""
    with RedisServer() as server:
        server.start()
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared Redis's URL, emptied (FLUSHALL) for this test."""
    if not redis_server.running:  # an earlier test stopped it after all
        redis_server.start()
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own (started; no persistence), to kill and restart."""
    with RedisServer() as server:
        server.start()
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A 3-master Redis cluster shared by the whole run."""
    with RedisClusterServers() as cluster:
        cluster.start()
        yield cluster


@pytest.fixture
def private_redis_cluster() -> Iterator[RedisClusterServers]:
    """A 3-master Redis cluster of this test's own (takes ~2 s to form)."""
    with RedisClusterServers() as cluster:
        cluster.start()
        yield cluster


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL shared by the whole run, with database ``kefu``. Don't kill it."""
    with PostgresServer() as server:
        server.start()
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A new empty database on the shared PostgreSQL (dropped when the next one is made)."""
    if not postgres_server.running:  # an earlier test stopped it after all
        postgres_server.start()
    name = f"test_{uuid.uuid4().hex[:16]}"
    url = postgres_server.fresh_database(name)
    yield url
    postgres_server.retire_database(name)


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own (started, database ``kefu``), to kill and restart."""
    with PostgresServer() as server:
        server.start()
        yield server
