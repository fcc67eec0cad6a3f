"""A local cluster for development and trials: ``kefu cluster up`` and ``kefu cluster down``.

``up`` starts, every one on 127.0.0.1:

- a ``redis-server`` on a free port (no persistence: Redis holds only what the nodes
  rebuild), unless ``--redis-url`` names a Redis;
- a PostgreSQL on a free port, its data made by ``initdb`` in ``DIR/postgres`` and kept
  across ``down`` and ``up`` (trust authentication for user ``postgres``, TCP only, database
  ``kefu``), unless ``--database-url`` names one; either way the migrations are applied;
- N nodes, ``python -m kefu serve`` with ids ``node-0`` .. ``node-(N-1)`` on consecutive
  ports from ``--base-port``, data in ``DIR/nodes/node-I``, sharing one JWT secret:
  the configured ``jwt_secret`` (``KEFU_JWT_SECRET``, ``--config``, ``--set``) when there is
  one, else one generated once into ``DIR/jwt-secret``.

Every process runs in its own session (it outlives ``up``, and a Ctrl-C in the terminal
does not reach it), writes its output to ``DIR/logs/NAME.log`` and has a pid file
``DIR/pids/NAME.pid`` (pid and start time, so a reused pid is never signalled). ``up``
prints the URLs once every node answers ``/ready``; if anything fails it stops what it
started and names the log to read. ``down`` sends SIGTERM to the nodes (a graceful drain),
then stops PostgreSQL (fast shutdown) and Redis, and SIGKILLs the process group of
anything still running after the grace period.

``initdb`` and ``postgres`` refuse to run as root: as root they run as the ``postgres``
system user (``setpriv``), and when that user cannot reach ``DIR`` (a directory under
``/root``, say) the data lives in a directory of its own under the system's temporary
directory, ``DIR/postgres`` being a symbolic link to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

HOST = "127.0.0.1"
SECRET_FILE = "jwt-secret"
STATE_FILE = "cluster.json"
PID_DIR = "pids"
LOG_DIR = "logs"
POSTGRES_USER = "postgres"
DATABASE = "kefu"
REDIS = "redis"
POSTGRES = "postgres"
#: Seconds a stopped process's group gets after SIGKILL before ``down`` gives up on it.
KILL_WAIT = 5.0
#: Starts the line ``up`` writes into a log before each process it starts there.
LOG_HEADER = "--- kefu cluster up "

__all__ = ["Plan", "down", "up"]


class Failed(Exception):
    """``up`` cannot go on; ``status`` is the exit status (2: usage or environment)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What ``kefu cluster up`` was asked for."""

    directory: Path
    nodes: int
    base_port: int = 8080
    #: Empty: start a redis-server / a PostgreSQL.
    redis_url: str = ""
    database_url: str = ""
    #: Passed to every node (``--config``, ``--set NAME=VALUE``).
    config_file: Path | None = None
    settings: tuple[str, ...] = ()
    #: Seconds each server may take to become ready.
    timeout: float = 60.0
    #: The nodes' ``node_heartbeat`` (how long they may take to see each other).
    heartbeat: float = 2.0
    #: The configured JWT secret (``KEFU_JWT_SECRET``, the file or ``--set``); empty: one
    #: generated once into ``DIR/jwt-secret``.
    jwt_secret: str = ""


# -- processes --------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks) from /proc, None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    try:
        return fields[0], int(fields[2]), int(fields[19])
    except (IndexError, ValueError):
        return None


def _has_proc() -> bool:
    return Path("/proc/self/stat").exists()


def _reap(pid: int) -> bool:
    """Collect ``pid`` if it is an exited child of this process; True when it was."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False  # not our child (started by another ``up``): init collects it
    return done == pid


def running(pid: int, started: int | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, when ``started`` is given, is the process
    that started then (not a later one that reused the pid)."""
    if _reap(pid):
        return False
    if _has_proc():
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            return False
        return started is None or stat[2] == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a process (other than a zombie) of process group ``pgid`` exists."""
    if not _has_proc():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
            return True
    return False


def _spawn(argv: Sequence[str], log: Path, env: dict[str, str]) -> int:
    """Start ``argv`` in a new session, output appended to ``log``; its pid.

    ``os.posix_spawn`` rather than ``subprocess.Popen``: the process is meant to outlive
    this one, which a Popen object would report as leaked.
    """
    return os.posix_spawn(
        argv[0],
        list(argv),
        env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
    )


@dataclasses.dataclass(slots=True)
class _Proc:
    name: str
    pid: int
    log: Path
    started: int | None = None


def _pid_file(directory: Path, name: str) -> Path:
    return directory / PID_DIR / f"{name}.pid"


def _record(directory: Path, proc: _Proc) -> None:
    stat = _proc_stat(proc.pid)
    proc.started = stat[2] if stat is not None else None
    path = _pid_file(directory, proc.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = "" if proc.started is None else f" {proc.started}"
    path.write_text(f"{proc.pid}{started}\n", encoding="ascii")


def _recorded(directory: Path) -> list[_Proc]:
    """The processes of the pid files in ``directory``: nodes first, then PostgreSQL,
    then Redis (the order to stop them in)."""
    found = []
    for path in sorted((directory / PID_DIR).glob("*.pid")):
        parts = path.read_text(encoding="ascii").split()
        try:
            pid = int(parts[0])
            started = int(parts[1]) if len(parts) > 1 else None
        except (IndexError, ValueError):
            path.unlink(missing_ok=True)
            continue
        found.append(_Proc(path.stem, pid, directory / LOG_DIR / f"{path.stem}.log", started))
    rank = {POSTGRES: 1, REDIS: 2}
    found.sort(key=lambda p: (rank.get(p.name, 0), _natural(p.name)))
    return found


def _natural(name: str) -> tuple[str, int]:
    match = re.fullmatch(r"(.*?)(\d+)", name)
    return (match[1], int(match[2])) if match else (name, -1)


def _stop(procs: Iterable[_Proc], sig: signal.Signals, grace: float) -> list[_Proc]:
    """Signal the processes, wait up to ``grace`` for them and their process groups (each
    leads its own) to end, then SIGKILL the groups; the ones that outlived even that."""
    live = [p for p in procs if running(p.pid, p.started)]

    def remaining() -> list[_Proc]:
        return [p for p in live if running(p.pid, p.started) or _group_alive(p.pid)]

    def wait(seconds: float) -> list[_Proc]:
        deadline = time.monotonic() + seconds
        while (left := remaining()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    for proc in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, sig)
    for proc in wait(grace):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return wait(KILL_WAIT)


def _stop_all(directory: Path, procs: Sequence[_Proc], grace: float) -> list[_Proc]:
    """Stop nodes, then PostgreSQL, then Redis; remove the pid files of stopped ones."""
    left: list[_Proc] = []
    nodes = [p for p in procs if p.name not in (POSTGRES, REDIS)]
    for group, sig in (
        (nodes, signal.SIGTERM),
        ([p for p in procs if p.name == POSTGRES], signal.SIGINT),  # fast shutdown
        ([p for p in procs if p.name == REDIS], signal.SIGTERM),
    ):
        if group:
            left += _stop(group, sig, grace)
    for proc in procs:
        if proc not in left:
            _pid_file(directory, proc.name).unlink(missing_ok=True)
    return left


def _tail(path: Path, lines: int = 15) -> str:
    """The last lines ``path`` got in this run (from the last ``up`` header on)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    start = text.rfind(LOG_HEADER)
    recent = text[start:] if start >= 0 else text
    return "\n".join("    " + line for line in recent.splitlines()[-lines:])


def _wait(
    proc: _Proc, what: str, check: Callable[[], bool], timeout: float, deadline: float = 0.0
) -> None:
    """Poll ``check`` until it holds; fail when the process exits or when ``timeout``
    seconds (or the ``deadline`` on the monotonic clock, when given) run out."""
    deadline = deadline or time.monotonic() + timeout
    while True:
        if not running(proc.pid):
            raise Failed(f"{what} exited during start-up; see {proc.log}:\n{_tail(proc.log)}")
        if check():
            return
        if time.monotonic() > deadline:
            raise Failed(f"{what} not ready after {timeout:g}s; see {proc.log}:\n{_tail(proc.log)}")
        time.sleep(0.05)


# -- ports and probes -------------------------------------------------------------------------


def port_free(port: int) -> bool:
    """Whether a node could listen on ``HOST:port`` (as it does, with SO_REUSEADDR:
    connections of an earlier node in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(avoid: Iterable[int] = (), *, host: str = HOST) -> int:
    """A port free on ``host`` now, outside ``avoid``."""
    taken = set(avoid)
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            return port


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def http_get(url: str, token: str = "", timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``url`` (a loopback URL): the status and body; status 0 when unreachable."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with _HTTP.open(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), bytes(exc.read())
    except (OSError, ValueError):
        return 0, b""


async def _pg_ready(url: str) -> bool:
    import asyncpg

    try:
        conn = await asyncpg.connect(url, timeout=1.0)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    await conn.close()
    return True


async def _create_database(url: str, name: str) -> bool:
    """Create database ``name`` unless it exists; whether it was created."""
    import asyncpg

    conn = await asyncpg.connect(url, timeout=5.0)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        await conn.execute(f'CREATE DATABASE "{name}"')
        return True
    finally:
        await conn.close()


async def _redis_reachable(url: str) -> str | None:
    """None when the Redis at ``url`` answers, else why not."""
    from kefu.cluster import redis_client as rc

    unreachable: tuple[type[BaseException], ...] = (
        *rc.REDIS_ERRORS,
        ValueError,  # a malformed URL
    )
    try:
        client, _ = await rc.connect(url)
    except unreachable as exc:
        return str(exc) or type(exc).__name__
    with contextlib.suppress(*rc.REDIS_ERRORS):
        await client.aclose()
    return None


# -- PostgreSQL ---------------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """The directory of ``initdb`` and ``postgres``: PATH first, else the highest
    ``/usr/lib/postgresql/<version>/bin`` (Debian keeps them there)."""
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb and postgres:
        return Path(postgres).resolve().parent

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    found = [
        bindir
        for bindir in Path("/usr/lib/postgresql").glob("*/bin")
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file()
    ]
    return max(found, key=version) if found else None


@dataclasses.dataclass(frozen=True, slots=True)
class _RunAs:
    """The user PostgreSQL runs as when we are root (it refuses root)."""

    uid: int
    gid: int

    def prefix(self) -> list[str]:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise Failed("running as root needs setpriv (util-linux) to start PostgreSQL", 2)
        return [setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--"]

    def can_write(self, path: Path) -> bool:
        probe = subprocess.run(
            ["test", "-w", str(path), "-a", "-x", str(path)],
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            check=False,
        )
        return probe.returncode == 0


def _run_as() -> _RunAs | None:
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        raise Failed(
            "PostgreSQL refuses to run as root and there is no 'postgres' user to run it "
            "as: create it (useradd --system --user-group postgres), run as another user, "
            "or pass --database-url",
            2,
        ) from None
    return _RunAs(entry.pw_uid, entry.pw_gid)


def _postgres_root(directory: Path, run_as: _RunAs | None) -> tuple[Path, str]:
    """The directory holding PostgreSQL's ``data`` (``DIR/postgres``, or where its link
    points) and a note for the user ("" when there is nothing to say)."""
    link = directory / "postgres"
    if link.is_symlink():
        target = link.resolve()
        if target.is_dir():
            return target, ""
        link.unlink()  # the temporary directory is gone (a reboot): start afresh
        note = f"{target} is gone: a new, empty database"
    else:
        note = ""
    if run_as is None:
        link.mkdir(exist_ok=True)
        return link, note
    if not link.exists():
        link.mkdir()
    os.chown(link, run_as.uid, run_as.gid)
    if run_as.can_write(link):
        return link, note
    # The postgres user cannot reach DIR (e.g. under /root): a directory of its own.
    link.rmdir()
    target = Path(tempfile.mkdtemp(prefix="kefu-cluster-postgres-"))
    os.chown(target, run_as.uid, run_as.gid)
    link.symlink_to(target, target_is_directory=True)
    return target, (
        f"the postgres user cannot reach {directory}: PostgreSQL's data is in {target} "
        f"({link} links to it)"
    )


def _initdb(bindir: Path, pgroot: Path, log: Path, run_as: _RunAs | None) -> bool:
    """Make ``pgroot/data`` unless it exists; whether it was made."""
    data = pgroot / "data"
    if (data / "PG_VERSION").exists():
        return False
    args = [
        str(bindir / "initdb"),
        "--pgdata", str(data),
        "--username", "postgres",
        "--auth", "trust",
        "--encoding", "UTF8",
        "--locale", "C",
    ]  # fmt: skip
    with log.open("ab") as out:
        done = subprocess.run(
            args,
            cwd=pgroot,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
            user=None if run_as is None else run_as.uid,
            group=None if run_as is None else run_as.gid,
            extra_groups=None if run_as is None else [],
        )
    if done.returncode != 0:
        raise Failed(f"initdb failed ({done.returncode}); see {log}:\n{_tail(log)}")
    return True


# -- up and down --------------------------------------------------------------------------------


def _secret(plan: Plan, directory: Path) -> tuple[str, str]:
    """The JWT secret for every node and how to mint tokens with it."""
    example = "kefu token --user boss --role admin"
    if plan.jwt_secret:
        config = (
            "" if plan.config_file is None else f" --config {shlex.quote(str(plan.config_file))}"
        )
        return (
            plan.jwt_secret,
            f"kefu token{config} --user boss --role admin   (the configured secret)",
        )
    path = directory / SECRET_FILE
    try:
        secret = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        secret = ""
    if not secret:
        secret = secrets.token_urlsafe(48)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secret + "\n")
    return secret, f"KEFU_JWT_SECRET=$(cat {shlex.quote(str(path))}) {example}"


def _ready(url: str) -> Callable[[], bool]:
    def check() -> bool:
        return http_get(f"{url}/ready")[0] == 200

    return check


class _Up:
    """One run of ``kefu cluster up``: what it started, to stop it all if it fails."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.dir = plan.directory.absolute()
        self.logs = self.dir / LOG_DIR
        self.started: list[_Proc] = []
        self.notes: list[str] = []
        self.env = dict(os.environ)
        self.ports = range(plan.base_port, plan.base_port + plan.nodes)

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> _Proc:
        log = self.logs / f"{name}.log"
        with log.open("a", encoding="utf-8") as out:
            out.write(f"{LOG_HEADER}{time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(argv)}\n")
        try:
            pid = _spawn(argv, log, env or self.env)
        except OSError as exc:
            raise Failed(f"cannot start {name} ({argv[0]}): {exc}", 2) from exc
        proc = _Proc(name, pid, log)
        self.started.append(proc)
        _record(self.dir, proc)
        return proc

    def redis(self) -> tuple[str, str]:
        """The Redis URL and how it came about."""
        if self.plan.redis_url:
            why = asyncio.run(_redis_reachable(self.plan.redis_url))
            if why is not None:
                raise Failed(f"cannot reach Redis at {self.plan.redis_url}: {why}", 2)
            return self.plan.redis_url, "given"
        server = shutil.which("redis-server")
        if server is None:
            raise Failed(
                "redis-server not found: install Redis (Debian: apt-get install redis-server) "
                "or pass --redis-url",
                2,
            )
        workdir = self.dir / "redis"
        workdir.mkdir(exist_ok=True)
        port = free_port(self.ports)
        proc = self.spawn(
            REDIS,
            [
                server,
                "--bind", HOST,
                "--port", str(port),
                "--dir", str(workdir),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--logfile", "",
            ],
        )  # fmt: skip
        _wait(proc, "redis-server", lambda: _redis_ping(port), self.plan.timeout)
        return f"redis://{HOST}:{port}/0", f"started here, log {proc.log}"

    def postgres(self) -> tuple[str, str]:
        """The PostgreSQL URL and how it came about."""
        if self.plan.database_url:
            return self.plan.database_url, "given"
        bindir = postgres_bindir()
        if bindir is None:
            raise Failed(
                "PostgreSQL's initdb/postgres not found: install PostgreSQL (Debian: apt-get "
                "install postgresql) or pass --database-url",
                2,
            )
        run_as = _run_as()
        pgroot, note = _postgres_root(self.dir, run_as)
        if note:
            self.notes.append(note)
        if _initdb(bindir, pgroot, self.logs / "initdb.log", run_as):
            self.notes.append(f"PostgreSQL initialised in {pgroot / 'data'}")
        port = free_port(self.ports)
        argv = [
            str(bindir / "postgres"),
            "-D", str(pgroot / "data"),
            "-h", HOST,
            "-p", str(port),
            "-c", "unix_socket_directories=",
            "-c", "lc_messages=C",
            "-c", f"cluster_name=kefu-cluster-{port}",
        ]  # fmt: skip
        if run_as is not None:
            argv = [*run_as.prefix(), *argv]
        proc = self.spawn(POSTGRES, argv)
        admin = f"postgresql://postgres@{HOST}:{port}/postgres"
        _wait(proc, "PostgreSQL", lambda: asyncio.run(_pg_ready(admin)), self.plan.timeout)
        asyncio.run(_create_database(admin, DATABASE))
        return f"postgresql://postgres@{HOST}:{port}/{DATABASE}", f"started here, log {proc.log}"

    def migrate(self, url: str) -> str:
        from kefu.cli import DatabaseUnavailable, migrate_database

        try:
            applied, version = asyncio.run(migrate_database(url, timeout=10.0))
        except DatabaseUnavailable as exc:
            raise Failed(str(exc), 2) from exc
        done = f", applied {', '.join(str(v) for v in applied)}" if applied else ""
        return f"schema version {version}{done}"

    def node_argv(self, index: int, redis_url: str, database_url: str) -> list[str]:
        argv = [
            sys.executable, "-m", "kefu", "serve",
            "--host", HOST,
            "--port", str(self.ports[index]),
            "--node-id", f"node-{index}",
            "--data-dir", str(self.dir / "nodes" / f"node-{index}"),
            "--redis-url", redis_url,
            "--database-url", database_url,
        ]  # fmt: skip
        if self.plan.config_file is not None:
            argv += ["--config", str(self.plan.config_file.absolute())]
        for setting in self.plan.settings:
            argv += ["--set", setting]
        return argv

    def converge(self, urls: list[str], token: str) -> str | None:
        """Wait until every node's ring holds every node; the ring version, or None."""
        want = {f"node-{i}" for i in range(len(urls))}
        deadline = time.monotonic() + 3 * self.plan.heartbeat + 5.0
        while True:
            versions: set[str] = set()
            for url in urls:
                status, body = http_get(f"{url}/api/v1/cluster", token)
                if status != 200:
                    break
                view = json.loads(body)
                if not want <= {n["id"] for n in view["nodes"]}:
                    break
                versions.add(str(view["ring_version"]))
            else:
                if len(versions) == 1:
                    return versions.pop()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def run(self) -> int:
        plan = self.plan
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        live = [p for p in _recorded(self.dir) if running(p.pid, p.started)]
        if live:
            names = ", ".join(f"{p.name} (pid {p.pid})" for p in live)
            raise Failed(
                f"a cluster already runs in {self.dir}: {names}; "
                f"stop it first: kefu cluster down --dir {shlex.quote(str(plan.directory))}",
                2,
            )
        for stale in _recorded(self.dir):
            _pid_file(self.dir, stale.name).unlink(missing_ok=True)
        busy = [port for port in self.ports if not port_free(port)]
        if busy:
            raise Failed(
                f"port{'s' if len(busy) > 1 else ''} {', '.join(map(str, busy))} on {HOST} "
                "already in use: choose another --base-port",
                2,
            )
        secret, mint = _secret(plan, self.dir)

        redis_url, redis_how = self.redis()
        database_url, database_how = self.postgres()
        schema = self.migrate(database_url)

        node_env = dict(self.env, KEFU_JWT_SECRET=secret)
        nodes = [
            self.spawn(f"node-{i}", self.node_argv(i, redis_url, database_url), node_env)
            for i in range(plan.nodes)
        ]
        urls = [f"http://{HOST}:{port}" for port in self.ports]
        deadline = time.monotonic() + plan.timeout
        for proc, url in zip(nodes, urls, strict=True):
            _wait(proc, proc.name, _ready(url), plan.timeout, deadline)
        from kefu.auth import issue_token

        version = self.converge(urls, issue_token(secret, "kefu-cluster", "admin", ttl=120))

        state = {
            "redis_url": redis_url,
            "database_url": database_url,
            "nodes": [
                {"id": p.name, "url": url, "pid": p.pid, "log": str(p.log)}
                for p, url in zip(nodes, urls, strict=True)
            ],
        }
        (self.dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")

        quoted = shlex.quote(str(plan.directory))
        lines = [f"kefu cluster: {plan.nodes} node{'s' if plan.nodes > 1 else ''} in {self.dir}"]
        lines += [
            f"  {p.name:<10} {url}   (log {p.log})" for p, url in zip(nodes, urls, strict=True)
        ]
        lines += [
            f"  {'redis':<10} {redis_url}   ({redis_how})",
            f"  {'postgresql':<10} {database_url}   ({database_how}; {schema})",
        ]
        if version is not None:
            lines.append(f"ring {version}: {', '.join(p.name for p in nodes)}")
        else:
            lines.append("warning: the nodes do not all see each other yet (see their logs)")
        lines += [f"note: {note}" for note in self.notes]
        lines += [
            f"tokens:  {mint}",
            f"route:   kefu route USER_ID --redis-url {redis_url}",
            f"stop:    kefu cluster down --dir {quoted}",
        ]
        print("\n".join(lines))
        return 0


def up(plan: Plan) -> int:
    """``kefu cluster up``: start everything, wait until ready, print the URLs.

    Exit status 0 when every node is ready; otherwise what this run started is stopped
    again and the status is 2 (wrong arguments or environment) or 1 (a server failed).
    """
    run = _Up(plan)
    try:
        return run.run()
    except Failed as exc:
        left = _stop_all(run.dir, run.started, 10.0)
        print(f"kefu cluster up: {exc}", file=sys.stderr)
        if run.started:
            print("kefu cluster up: stopped what this run had started", file=sys.stderr)
        for proc in left:
            print(f"kefu cluster up: {proc.name} (pid {proc.pid}) still runs", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        _stop_all(run.dir, run.started, 10.0)
        print("kefu cluster up: interrupted; stopped what this run had started", file=sys.stderr)
        return 130
    except BaseException:
        _stop_all(run.dir, run.started, 10.0)
        raise


def down(directory: Path, *, grace: float = 20.0) -> int:
    """``kefu cluster down``: stop what ``up`` started in ``directory``.

    Nodes get SIGTERM (a graceful drain), PostgreSQL SIGINT (fast shutdown), Redis SIGTERM;
    each in turn, and the process group of any still running after ``grace`` seconds gets
    SIGKILL. Exit status 0 when nothing is left running, 1 otherwise.
    """
    directory = directory.absolute()
    procs = _recorded(directory)
    live = [p for p in procs if running(p.pid, p.started)]
    for proc in procs:
        if proc not in live:
            _pid_file(directory, proc.name).unlink(missing_ok=True)
    if not live:
        print(f"kefu cluster: nothing runs in {directory}")
        (directory / STATE_FILE).unlink(missing_ok=True)
        return 0
    left = _stop_all(directory, live, grace)
    for proc in live:
        if proc not in left:
            print(f"stopped {proc.name} (pid {proc.pid})")
    for proc in left:
        print(f"kefu cluster down: {proc.name} (pid {proc.pid}) still runs", file=sys.stderr)
    if left:
        return 1
    (directory / STATE_FILE).unlink(missing_ok=True)
    return 0
