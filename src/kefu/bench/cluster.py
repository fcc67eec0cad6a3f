"""``kefu bench cluster``: a real cluster on loopback, Redis + PostgreSQL + N nodes.

Two modes, each rewriting its own section of docs/benchmarks.md:

* **Throughput** (default): ``kefu cluster up``'s machinery starts a ``redis-server``, a
  PostgreSQL and N nodes (3) as real processes (or takes ``--redis-url`` /
  ``--database-url``); the generator's sockets are dealt round-robin over the nodes, so
  each pair's agent (connection ``2p``) and customer (``2p + 1``) are on different nodes
  and every message is acked by one node and pushed by another, through Redis. A ladder
  of offered rates (:func:`~kefu.bench.scenarios.saturate`), then sustained windows at
  the latency target's rate and at the throughput target's rate
  (:func:`~kefu.bench.scenarios.sustained`). Around every step the bench reads Redis
  ``INFO`` (commands, per-command calls, CPU), ``pg_stat_database`` (transactions),
  every node's ``/metrics`` and /proc (CPU, RSS): :class:`Figures`.
* **Connection capacity** (``--connections N``): M nodes (6), idle connections opened in
  steps by several generator processes from source addresses 127.0.0.2, ... (each
  process stays under the open-file limit); after each step a quiet window (Redis
  commands/s, PostgreSQL transactions/s, node CPU with heartbeats on) and a cross-node
  probe: a few messages between pairs on different nodes must be acked and delivered.
  The run stops at the first step that fails, and says why.

Everything runs on this machine: the nodes, Redis, PostgreSQL and the generator share its
cores, and only loopback addresses are used.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import math
import os
import resource
import secrets
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

import redis

from kefu.bench.desk import StoreFigures
from kefu.bench.local import rate_settings
from kefu.bench.procfs import (
    SPEED,
    Pids,
    cpu_seconds,
    machine,
    mem_available_kb,
    python_speed,
    rss_kb,
)
from kefu.bench.report import (
    CAPACITY_BEGIN,
    CAPACITY_END,
    CLUSTER_BEGIN,
    CLUSTER_END,
    SUSTAINED_P99_TARGET_MS,
    md_table,
    text_table,
)
from kefu.bench.scenarios import (
    HOLD_P99_MS,
    HOLD_SHARE,
    Opened,
    Saturation,
    Sustained,
    open_conversations,
    saturate,
    sustained,
    why_not,
)
from kefu.bench.stats import (
    is_loopback_url,
    merge_counts,
    prom_samples,
    sample_sum,
    source_addresses,
    workers_for,
)
from kefu.bench.swarm import Plan, Step, Swarm, build_specs

Progress = Callable[[str], None]
NAN = math.nan

#: The JWT secret of the clusters this bench starts (they live only as long as the run).
SECRET = secrets.token_urlsafe(32)
#: Targets (the issue's): persisted msg/s across nodes, p99 at the latency rate,
#: concurrent connections.
THROUGHPUT_TARGET = 10_000.0
#: The rate the throughput windows offer. A window acks a little less than it offers (the
#: sends of its last milliseconds are acked in the drain), so showing ">= 10,000 acked/s"
#: takes an offer above the target: the verdict is on the acked rate, never the offer.
THROUGHPUT_OFFER = 10_500.0
CONNECTIONS_TARGET = 150_000
#: Sockets per source address in capacity mode (each address has ~28k ephemeral ports).
PER_ADDRESS = 20_000
#: Sockets per generator process in throughput mode. One process drives 6,000 sockets at
#: 12,000 msg/s on a third of a core; a second one only adds wakeups (5% of a core more
#: at 10,500 msg/s, and a slower p50, in interleaved runs).
THROUGHPUT_WORKER_SOCKETS = 10_000
#: Open files a generator process or a node needs besides its sockets.
FD_MARGIN = 200
#: The key of the speed probe run after the throughput run (:func:`procfs.python_speed`).
SPEED_AFTER = "python loop after (s)"

#: Capacity mode stops before a step when the machine has less memory available.
MIN_AVAILABLE_KB = 2 * 1024 * 1024


# -- Redis: one command on a fresh connection ---------------------------------------------


def redis_call(
    host: str, port: int, *args: str, password: str | None = None, username: str | None = None
) -> str:
    """One command to the Redis at ``host:port`` on a fresh connection; its raw text reply
    (redis-py's connection, without the client's reply parsing: ``INFO`` stays text)."""
    conn = redis.Connection(  # type: ignore[no-untyped-call]
        host=host,
        port=port,
        username=username,
        password=password,
        socket_timeout=5.0,
        socket_connect_timeout=5.0,
        decode_responses=True,
    )
    try:
        conn.send_command(*args)  # type: ignore[no-untyped-call]
        return str(conn.read_response())
    except redis.RedisError as exc:
        raise ConnectionError(f"redis {host}:{port}: {exc}") from exc
    finally:
        conn.disconnect()  # type: ignore[no-untyped-call]


def parse_info(text: str) -> dict[str, str]:
    """The ``field:value`` lines of a Redis ``INFO`` reply."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and ":" in line:
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip()
    return out


def command_calls(info: dict[str, str]) -> dict[str, int]:
    """Calls per command from ``INFO commandstats`` fields (``cmdstat_hvals:calls=3,...``);
    subcommands keep their name (``script|load``)."""
    out: dict[str, int] = {}
    for key, value in info.items():
        if key.startswith("cmdstat_"):
            fields = dict(p.split("=", 1) for p in value.split(",") if "=" in p)
            with contextlib.suppress(KeyError, ValueError):
                out[key[len("cmdstat_") :]] = int(fields["calls"])
    return out


def cluster_node_addresses(text: str) -> list[tuple[str, int]]:
    """The (host, port) of every reachable node in a ``CLUSTER NODES`` reply."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or "noaddr" in fields[2] or "fail" in fields[2].split(","):
            continue
        address = fields[1].split("@", 1)[0]
        host, _, port = address.rpartition(":")
        if host and port.isdigit() and int(port) > 0:
            out.append((host.strip("[]"), int(port)))
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class RedisSample:
    """What every Redis server of the cluster had done at one moment (summed)."""

    commands: int
    calls: dict[str, int]
    cpu: float  # used_cpu_user + used_cpu_sys, seconds
    memory: int  # used_memory, bytes
    clients: int

    @classmethod
    def of(cls, infos: Sequence[dict[str, str]]) -> RedisSample:
        calls = merge_counts(command_calls(info) for info in infos)

        def total(field: str) -> float:
            return sum(float(info.get(field, 0) or 0) for info in infos)

        return cls(
            commands=int(total("total_commands_processed")),
            calls=calls,
            cpu=total("used_cpu_user") + total("used_cpu_sys"),
            memory=int(total("used_memory")),
            clients=int(total("connected_clients")),
        )


class RedisStats:
    """Reads INFO from every server of a Redis (standalone, or every node of a Cluster)."""

    def __init__(self, url: str) -> None:
        from kefu.cluster.redis_client import parse_url

        target = parse_url(url)
        self.username, self.password = target.username, target.password
        self.servers: list[tuple[str, int]] = []
        if target.tls:
            return  # INFO over a plain socket only; the figures stay empty
        for host, port in target.seeds:
            with contextlib.suppress(OSError):
                info = parse_info(self._call(host, port, "INFO", "cluster"))
                if info.get("cluster_enabled") == "1":
                    nodes = cluster_node_addresses(self._call(host, port, "CLUSTER", "NODES"))
                    self.servers = nodes or [(host, port)]
                else:
                    self.servers = [(host, port)]
                return

    def _call(self, host: str, port: int, *args: str) -> str:
        return redis_call(host, port, *args, password=self.password, username=self.username)

    def sample(self) -> RedisSample | None:
        infos = []
        for host, port in self.servers:
            try:
                infos.append(parse_info(self._call(host, port, "INFO", "all")))
            except OSError:
                return None
        return RedisSample.of(infos) if infos else None


def loopback_server(url: str) -> bool:
    """Whether every host of a ``redis://`` URL (a seed list too) or a ``postgresql://``
    URL is a loopback address (or ``localhost``)."""
    from kefu.cluster.redis_client import parse_url

    try:
        if url.startswith(("redis://", "rediss://")):
            hosts = [host for host, _ in parse_url(url).seeds]
        elif url.startswith(("postgresql://", "postgres://")):
            hosts = [urllib.parse.urlsplit(url).hostname or ""]
        else:
            return False
    except ValueError:
        return False
    return all(is_loopback_url(f"http://{host}/") for host in hosts)


# -- PostgreSQL ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class PgSample:
    """The database's counters from ``pg_stat_database`` (and ``pg_stat_wal``)."""

    commits: int
    rollbacks: int
    inserted: int
    wal_bytes: float


async def _pg_sample(url: str) -> PgSample:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=5.0)
    try:
        row = await conn.fetchrow(
            "SELECT xact_commit, xact_rollback, tup_inserted FROM pg_stat_database "
            "WHERE datname = current_database()"
        )
        wal = NAN
        with contextlib.suppress(asyncpg.PostgresError):  # pg_stat_wal: PostgreSQL 14+
            wal = float(await conn.fetchval("SELECT wal_bytes FROM pg_stat_wal"))
    finally:
        await conn.close()
    assert row is not None
    return PgSample(int(row[0]), int(row[1]), int(row[2]), wal)


def pg_sample(url: str) -> PgSample | None:
    try:
        return asyncio.run(_pg_sample(url))
    except Exception:  # unreachable, or no such view: the figures stay empty
        return None


# -- snapshots and what happened between two ------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Snapshot:
    at: float
    redis: RedisSample | None
    pg: PgSample | None
    pg_cpu: float | None
    node_cpu: list[float | None]
    node_rss: list[int | None]
    metrics: list[str]


def _cores(before: float | None, after: float | None, seconds: float) -> float:
    if before is None or after is None or seconds <= 0:
        return NAN
    return (after - before) / seconds


@dataclasses.dataclass(slots=True)
class Figures:
    """The cluster's side of one step (window and drain): deltas between two snapshots."""

    seconds: float
    redis_commands: float  # total_commands_processed delta
    redis_calls: dict[str, int]
    redis_cpu: float  # cores
    redis_memory: int  # bytes, at the end
    pg_commits: float
    pg_inserted: float
    wal_bytes: float
    pg_cpu: float  # cores (postmaster and its backends), NaN when not started here
    node_cpu: list[float]  # cores, per node
    node_rss_kb: list[int | None]  # at the end, per node
    #: At the end, per node (websocket_connections_total); NaN: /metrics did not answer.
    node_connections: list[float]
    publishes: float
    deliveries: dict[str, float]  # by path: local, remote, received, inbox
    redis_by_kind: dict[str, float]  # kefu_cluster_redis_commands_total by kind
    cluster_errors: float
    store: StoreFigures
    #: The machine's CPUs (for its idle share).
    cpus: int = dataclasses.field(default_factory=lambda: len(os.sched_getaffinity(0)))

    @classmethod
    def between(cls, before: Snapshot, after: Snapshot) -> Figures:
        seconds = max(1e-6, after.at - before.at)
        parsed0 = [prom_samples(t) for t in before.metrics]
        parsed1 = [prom_samples(t) for t in after.metrics]

        def delta(name: str, **labels: str) -> float:
            return sum(sample_sum(s, name, **labels) for s in parsed1) - sum(
                sample_sum(s, name, **labels) for s in parsed0
            )

        r0, r1 = before.redis, after.redis
        calls: dict[str, int] = {}
        if r0 is not None and r1 is not None:
            calls = {k: v - r0.calls.get(k, 0) for k, v in r1.calls.items()}
            calls = {k: v for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v > 0}
        p0, p1 = before.pg, after.pg
        return cls(
            seconds=seconds,
            redis_commands=NAN if r0 is None or r1 is None else r1.commands - r0.commands,
            redis_calls=calls,
            redis_cpu=NAN if r0 is None or r1 is None else (r1.cpu - r0.cpu) / seconds,
            redis_memory=0 if r1 is None else r1.memory,
            pg_commits=NAN if p0 is None or p1 is None else p1.commits - p0.commits,
            pg_inserted=NAN if p0 is None or p1 is None else p1.inserted - p0.inserted,
            wal_bytes=NAN if p0 is None or p1 is None else p1.wal_bytes - p0.wal_bytes,
            pg_cpu=_cores(before.pg_cpu, after.pg_cpu, seconds),
            node_cpu=[
                _cores(b, a, seconds) for b, a in zip(before.node_cpu, after.node_cpu, strict=True)
            ],
            node_rss_kb=list(after.node_rss),
            node_connections=[
                sample_sum(s, "websocket_connections_total") if text else NAN
                for s, text in zip(parsed1, after.metrics, strict=True)
            ],
            publishes=delta("kefu_cluster_publishes_total"),
            deliveries={
                path: delta("kefu_cluster_deliveries_total", path=path)
                for path in ("local", "remote", "received", "inbox")
            },
            redis_by_kind={
                kind: delta("kefu_cluster_redis_commands_total", kind=kind)
                for kind in ("lookup", "publish", "presence", "inbox")
            },
            cluster_errors=delta("kefu_cluster_errors_total"),
            store=StoreFigures.between("\n".join(before.metrics), "\n".join(after.metrics)),
        )

    @property
    def nodes_cpu(self) -> float:
        return sum(self.node_cpu)

    @property
    def redis_rate(self) -> float:
        return self.redis_commands / self.seconds

    @property
    def pg_rate(self) -> float:
        return self.pg_commits / self.seconds


def per(value: float, count: float) -> float:
    """``value / count``, NaN when there is nothing to divide by."""
    return value / count if count and not math.isnan(count) else NAN


# -- the cluster --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class NodeProcess:
    id: str
    url: str
    pid: int
    log: str


def _pid_of(directory: Path, name: str) -> int | None:
    try:
        return int((directory / "pids" / f"{name}.pid").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None


def _free_base_port(count: int) -> int:
    """The first of ``count`` consecutive free ports below the ephemeral range."""
    from kefu.cluster.local import port_free

    for base in range(21_000, 32_000 - count, 97):
        if all(port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports in 21000..32000")


class LocalCluster:
    """Redis, PostgreSQL and ``nodes`` nodes started with ``kefu cluster up``'s code in a
    temporary directory; :meth:`close` runs ``kefu cluster down`` and removes it."""

    def __init__(
        self,
        nodes: int,
        settings: dict[str, str],
        *,
        redis_url: str = "",
        database_url: str = "",
        progress: Progress = print,
    ) -> None:
        from kefu.cluster import local

        self.dir = Path(tempfile.mkdtemp(prefix="kefu-bench-cluster-"))
        os.chmod(self.dir, 0o755)  # PostgreSQL runs as its own user and keeps its data here
        plan = local.Plan(
            directory=self.dir,
            nodes=nodes,
            base_port=_free_base_port(nodes),
            redis_url=redis_url,
            database_url=database_url,
            settings=tuple(f"{k}={v}" for k, v in settings.items()),
            jwt_secret=SECRET,
        )
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = local.up(plan)
        if status != 0:
            self._remove()
            raise RuntimeError(f"kefu cluster up failed ({status}):\n{out.getvalue()}")
        for line in out.getvalue().splitlines():
            if line.startswith(("ring", "warning", "  redis", "  postgresql")):
                progress(line.strip())
        state = json.loads((self.dir / local.STATE_FILE).read_text())
        self.redis_url: str = state["redis_url"]
        self.database_url: str = state["database_url"]
        self.nodes = [
            NodeProcess(n["id"], n["url"], int(n["pid"]), n["log"]) for n in state["nodes"]
        ]
        self.redis_pid = None if redis_url else _pid_of(self.dir, local.REDIS)
        self.pg_pid = None if database_url else _pid_of(self.dir, local.POSTGRES)
        self.settings = settings
        self.redis = RedisStats(self.redis_url)
        self.closed = False

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(n.url for n in self.nodes)

    @property
    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes]

    def metrics(self) -> list[str]:
        from kefu.cluster.local import http_get

        return [http_get(f"{n.url}/metrics", timeout=10.0)[1].decode() for n in self.nodes]

    def snapshot(self) -> Snapshot:
        return Snapshot(
            at=time.monotonic(),
            redis=self.redis.sample(),
            pg=pg_sample(self.database_url),
            pg_cpu=cpu_seconds(self.pg_pid) if self.pg_pid else None,
            node_cpu=[cpu_seconds(pid) for pid in self.pids],
            node_rss=[rss_kb(pid) for pid in self.pids],
            metrics=self.metrics(),
        )

    def dead(self) -> list[str]:
        """Nodes whose process is gone (with the end of their log)."""
        from kefu.cluster.local import running

        out = []
        for node in self.nodes:
            if not running(node.pid):
                try:
                    tail = Path(node.log).read_text(errors="replace").splitlines()[-5:]
                except OSError:
                    tail = []
                out.append(f"{node.id} exited ({' | '.join(tail)})")
        return out

    def log_errors(self) -> dict[str, int]:
        """Lines of the nodes' logs with ERROR or 'Too many open files', per node."""
        out: dict[str, int] = {}
        for node in self.nodes:
            with contextlib.suppress(OSError):
                text = Path(node.log).read_text(errors="replace")
                count = sum(
                    1 for line in text.splitlines() if "ERROR" in line or "open files" in line
                )
                if count:
                    out[node.id] = count
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        from kefu.cluster import local

        with contextlib.redirect_stdout(io.StringIO()):
            local.down(self.dir, grace=20.0)
        self._remove()

    def _remove(self) -> None:
        link = self.dir / "postgres"
        if link.is_symlink():
            shutil.rmtree(link.resolve(), ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass(slots=True)
class Observed:
    """One step of the generator and what the cluster did meanwhile."""

    step: Step
    figures: Figures


class ClusterSwarm(Swarm):
    """A :class:`Swarm` that snapshots the cluster around every step it runs."""

    def __init__(self, plan: Plan, cluster: LocalCluster) -> None:
        super().__init__(plan)
        self.cluster = cluster
        self.observed: list[Observed] = []

    def run(self, rate: float, duration: float, drain: float, server_pid: Pids) -> Step:
        before = self.cluster.snapshot()
        step = super().run(rate, duration, drain, server_pid)
        self.observed.append(Observed(step, Figures.between(before, self.cluster.snapshot())))
        return step

    def __enter__(self) -> ClusterSwarm:
        return self

    def take(self, steps: Sequence[Step]) -> list[Observed]:
        return [o for o in self.observed if any(o.step is s for s in steps)]


def cross_node(plan: Plan) -> bool:
    """Whether every pair of ``plan`` has its agent and its customer on different nodes."""
    return all(
        pair.agent.url != pair.customer.url for spec in build_specs(plan) for pair in spec.pairs
    )


# -- throughput -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterOptions:
    nodes: int = 3
    sockets: int = 6_000
    workers: int | None = None
    text_size: int = 100
    steps: tuple[float, ...] = (1000, 2000, 3000, 4000, 5000, 6500, 8000, 9000, 10500, 12000)
    step_seconds: float = 8.0
    drain: float = 5.0
    rate: float = 5_000.0  # the latency target's rate
    target_rate: float = THROUGHPUT_OFFER  # what the throughput windows offer
    windows: int = 3
    window_seconds: float = 10.0
    warmup_seconds: float = 5.0
    connect_timeout: float = 240.0
    redis_url: str = ""
    database_url: str = ""
    settings: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(slots=True)
class ClusterResults:
    options: ClusterOptions
    machine: dict[str, str]
    node_settings: dict[str, str]
    started: float
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    finished: float = 0.0
    connected: int = 0
    connect_seconds: float = NAN
    connect_errors: dict[str, int] = dataclasses.field(default_factory=dict)
    opened: Opened | None = None
    ladder: list[Observed] = dataclasses.field(default_factory=list)
    latency: list[Observed] = dataclasses.field(default_factory=list)
    throughput: list[Observed] = dataclasses.field(default_factory=list)
    rss_idle_kb: list[int | None] = dataclasses.field(default_factory=list)

    @property
    def saturation(self) -> Saturation:
        return Saturation(steps=[o.step for o in self.ladder])

    def held(self, which: str) -> Sustained:
        windows = self.latency if which == "latency" else self.throughput
        rate = self.options.rate if which == "latency" else self.options.target_rate
        return Sustained(rate=rate, windows=[o.step for o in windows])

    @property
    def best_rate(self) -> float:
        """The most persisted msg/s the cluster sustained: the best held ladder step, or
        the median of the throughput windows when they held (median acked >= 95% of the
        offered rate and median p99 <= the hold limit), whichever is higher."""
        rates = [self.saturation.max_rate]
        through = self.held("throughput")
        if (
            self.throughput
            and through.median_ack_rate >= HOLD_SHARE * through.rate
            and through.median_p99 <= HOLD_P99_MS
        ):
            rates.append(through.median_ack_rate)
        finite = [r for r in rates if not math.isnan(r)]
        return max(finite) if finite else NAN


def _versions(cluster: LocalCluster) -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        if cluster.redis.servers:
            host, port = cluster.redis.servers[0]
            info = parse_info(redis_call(host, port, "INFO", "server"))
            out["redis"] = info.get("redis_version", "?")

    async def pg() -> str:
        import asyncpg

        conn = await asyncpg.connect(cluster.database_url, timeout=5.0)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    with contextlib.suppress(Exception):
        out["postgresql"] = asyncio.run(pg()).split()[0]
    return out


def generator_workers(options: ClusterOptions) -> int:
    """The throughput mode's generator processes: ``--workers``, else one per
    :data:`THROUGHPUT_WORKER_SOCKETS` sockets."""
    return options.workers or workers_for(
        options.sockets, per_worker=THROUGHPUT_WORKER_SOCKETS, minimum=1
    )


def run_cluster(options: ClusterOptions, progress: Progress) -> ClusterResults:
    top = max((*options.steps, options.rate, options.target_rate))
    settings = {"log_level": "WARNING", **rate_settings(top, options.sockets)}
    settings.update(dict(options.settings))
    results = ClusterResults(
        options=options, machine=machine(), node_settings=settings, started=time.time()
    )
    progress(f"cluster: starting Redis, PostgreSQL and {options.nodes} nodes")
    with LocalCluster(
        options.nodes,
        settings,
        redis_url=options.redis_url,
        database_url=options.database_url,
        progress=progress,
    ) as cluster:
        results.versions = _versions(cluster)
        plan = Plan(
            mode="kefu",
            urls=cluster.urls,
            connections=options.sockets,
            workers=generator_workers(options),
            secret=SECRET,
            text_size=options.text_size,
            tag=f"c{secrets.token_hex(3)}",
        )
        if not cross_node(plan):
            raise RuntimeError("some pairs would have both ends on one node")
        with ClusterSwarm(plan, cluster) as swarm:
            _throughput(options, results, cluster, swarm, progress)
        dead = cluster.dead()
        if dead:
            raise RuntimeError("nodes died during the run: " + "; ".join(dead))
    results.finished = time.time()
    results.machine[SPEED_AFTER] = f"{python_speed():.3f}"
    return results


def _throughput(
    options: ClusterOptions,
    results: ClusterResults,
    cluster: LocalCluster,
    swarm: ClusterSwarm,
    progress: Progress,
) -> None:
    progress(f"connecting {options.sockets:,} sockets over {options.nodes} nodes")
    parts = swarm.connect(options.connect_timeout)
    results.connected = sum(p.connected for p in parts)
    results.connect_seconds = max(p.seconds for p in parts)
    results.connect_errors = merge_counts(p.errors for p in parts)
    progress(f"{results.connected:,} connected in {results.connect_seconds:.1f}s")
    results.opened = open_conversations(swarm, options.connect_timeout)
    progress(f"opened {results.opened.opened:,} conversations in {results.opened.seconds:.1f}s")
    time.sleep(1.0)
    results.rss_idle_kb = [rss_kb(pid) for pid in cluster.pids]
    pids = cluster.pids
    if options.warmup_seconds > 0:  # caches, prepared statements, pools: not reported
        warm = swarm.run(options.steps[0], options.warmup_seconds, options.drain, pids)
        progress(f"warm-up {options.steps[0]:,.0f}/s: {why_not(warm) or 'held'}")
    ladder = saturate(
        swarm, options.steps, options.step_seconds, options.drain, pids, progress, failures=2
    )
    results.ladder = swarm.take(ladder.steps)
    _log_figures(results.ladder, progress)
    for which, rate in (("latency", options.rate), ("throughput", options.target_rate)):
        held = sustained(
            swarm, rate, options.windows, options.window_seconds, options.drain, pids, progress
        )
        observed = swarm.take(held.windows)
        _log_figures(observed, progress)
        if which == "latency":
            results.latency = observed
        else:
            results.throughput = observed


def _log_figures(observed: Sequence[Observed], progress: Progress) -> None:
    for o in observed:
        fig = o.figures
        progress(
            f"  {o.step.offered:,.0f}/s: redis {fig.redis_rate:,.0f} cmd/s "
            f"({per(fig.redis_commands, o.step.delivered_total):.2f}/delivered), "
            f"pg {fig.pg_rate:,.0f} xact/s, nodes {fig.nodes_cpu:.0%} redis "
            f"{fig.redis_cpu:.0%} pg {fig.pg_cpu:.0%}"
        )


# -- connection capacity ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class CapacityOptions:
    nodes: int = 6
    target: int = CONNECTIONS_TARGET
    step: int = 25_000
    per_worker: int = 12_500
    idle_seconds: float = 10.0
    settle_seconds: float = 3.0
    probe_seconds: float = 3.0
    probe_rate: float = 0.0  # 0: 4 messages a second per probe pair
    drain: float = 5.0
    connect_timeout: float = 180.0
    redis_url: str = ""
    database_url: str = ""
    settings: tuple[tuple[str, str], ...] = ()


def capacity_targets(target: int, step: int, nodes: int) -> list[int]:
    """Cumulative connection counts of the steps: multiples of ``step`` up to ``target``,
    each rounded down to a multiple of ``2 * nodes`` (pairs dealt evenly over the nodes)."""
    if target < 1 or step < 1 or nodes < 1:
        raise ValueError("target, step and nodes must be positive")
    unit = 2 * nodes
    out: list[int] = []
    at = 0
    while at < target:
        at = min(target, at + step)
        rounded = at // unit * unit
        if rounded > (out[-1] if out else 0):
            out.append(rounded)
    return out


def address_blocks(sizes: Sequence[int], per_address: int, first: int = 3) -> list[list[str]]:
    """Source addresses for groups of sockets that must not share one (each group gets
    enough addresses for ``per_address`` sockets each), from 127.0.0.``first`` on."""
    out = []
    for size in sizes:
        block = source_addresses(size, per_address=per_address, minimum=1, first=first)
        out.append(block)
        first += len(block)
    return out


@dataclasses.dataclass(slots=True)
class CapacityStep:
    target: int
    requested: int
    connected: int  # of this step's new sockets
    failed: int
    connect_seconds: float
    connect_errors: dict[str, int]
    dropped: dict[str, int]  # errors reported by the earlier steps' sockets meanwhile
    connecting: Figures
    idle: Figures
    client_rss_kb: int
    clients: int  # sockets held by the generator (all steps)
    probe: Step | None
    available_kb: int | None
    log_errors: dict[str, int]
    stop: str = ""

    @property
    def total(self) -> float:
        """Connections the nodes report (websocket_connections_total, summed); NaN when a
        node's /metrics did not answer."""
        return sum(self.idle.node_connections)

    @property
    def probe_ok(self) -> bool:
        p = self.probe
        return (
            p is not None
            and p.sent > 0
            and p.acked_total == p.sent
            and p.delivered_total == p.sent
            and not p.errors
        )


@dataclasses.dataclass(slots=True)
class CapacityResults:
    options: CapacityOptions
    machine: dict[str, str]
    node_settings: dict[str, str]
    started: float
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    finished: float = 0.0
    base_rss_kb: list[int | None] = dataclasses.field(default_factory=list)
    steps: list[CapacityStep] = dataclasses.field(default_factory=list)
    stop: str = ""

    @property
    def good(self) -> list[CapacityStep]:
        return [s for s in self.steps if not s.stop]

    @property
    def reached(self) -> float:
        """The most concurrent connections with every check passing."""
        return max((s.total for s in self.good if not math.isnan(s.total)), default=0.0)

    def up(self, step: CapacityStep) -> int:
        """Sockets the generator had up after ``step`` (every step's new ones so far)."""
        upto = self.steps.index(step) + 1
        return sum(s.connected for s in self.steps[:upto])


def hard_nofile() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return hard if hard != resource.RLIM_INFINITY else 1 << 20


def capacity_problem(options: CapacityOptions) -> str | None:
    if options.nodes < 2:
        return "--nodes must be >= 2 (the probe is cross-node)"
    if not 2 * options.nodes <= options.step <= options.target:
        return "--conn-step must be between 2 x --nodes and --connections"
    if options.per_worker < 100 or options.per_worker > hard_nofile() - FD_MARGIN:
        return (
            f"--per-worker must be 100..{hard_nofile() - FD_MARGIN} (the open-file hard "
            "limit of a generator process, less a margin)"
        )
    if options.target > 250_000:
        return "--connections above 250,000 is out of bounds"
    return None


def stop_reason(step: CapacityStep, dead: Sequence[str]) -> str:
    """Why a capacity step fails ('' when it passed): the first failed check."""
    if dead:
        return "; ".join(dead)
    if step.failed or step.connected < step.requested:
        errors = ", ".join(f"{k} {v:,}" for k, v in step.connect_errors.items()) or "none"
        return (
            f"{step.requested - step.connected:,} of {step.requested:,} new connections "
            f"failed (client errors: {errors})"
        )
    if step.dropped:
        errors = ", ".join(f"{k} {v:,}" for k, v in step.dropped.items())
        return f"earlier connections dropped: {errors}"
    if not step.probe_ok:
        p = step.probe
        if p is None:
            return "probe did not run"
        return (
            f"probe: {p.delivered_total}/{p.sent} delivered, {p.acked_total}/{p.sent} acked, "
            f"errors {merge_counts([p.errors]) or 0}"
        )
    return ""


def run_capacity(options: CapacityOptions, progress: Progress) -> CapacityResults:
    settings = {"log_level": "WARNING", **dict(options.settings)}
    results = CapacityResults(
        options=options, machine=machine(), node_settings=settings, started=time.time()
    )
    limit = hard_nofile()
    if options.target > options.nodes * (limit - FD_MARGIN):
        progress(
            f"note: {options.target:,} connections over {options.nodes} nodes is more than "
            f"the open-file hard limit allows ({limit:,} per process)"
        )
    progress(f"cluster: starting Redis, PostgreSQL and {options.nodes} nodes")
    swarms: list[Swarm] = []
    with LocalCluster(
        options.nodes,
        settings,
        redis_url=options.redis_url,
        database_url=options.database_url,
        progress=progress,
    ) as cluster:
        results.versions = _versions(cluster)
        try:
            _capacity_steps(options, results, cluster, swarms, progress)
        finally:
            progress(f"closing {len(swarms)} groups of sockets")
            for swarm in reversed(swarms):
                swarm.close()
    results.finished = time.time()
    return results


def _capacity_steps(
    options: CapacityOptions,
    results: CapacityResults,
    cluster: LocalCluster,
    swarms: list[Swarm],
    progress: Progress,
) -> None:
    tag = f"k{secrets.token_hex(3)}"
    pairs = options.nodes
    probe = Swarm(
        Plan(
            mode="kefu",
            urls=cluster.urls,
            connections=2 * pairs,
            workers=1,
            secret=SECRET,
            text_size=50,
            sources=("127.0.0.2",),
            tag=f"{tag}p",
        )
    )
    swarms.append(probe)
    probe.connect(60.0)
    opened = open_conversations(probe, 60.0)
    if opened.opened != pairs:
        raise RuntimeError(f"probe: opened {opened.opened}/{pairs} conversations")
    time.sleep(1.0)
    results.base_rss_kb = [rss_kb(pid) for pid in cluster.pids]
    targets = capacity_targets(options.target, options.step, options.nodes)
    sizes = [b - a for a, b in zip([0, *targets], targets, strict=False)]
    blocks = address_blocks(sizes, PER_ADDRESS)
    idle: list[Swarm] = []
    probe_rate = options.probe_rate or 4.0 * pairs
    for k, (target, size) in enumerate(zip(targets, sizes, strict=True)):
        available = mem_available_kb()
        if available is not None and available < MIN_AVAILABLE_KB:
            results.stop = (
                f"before {target:,}: only {available / 1024 / 1024:.1f} GiB of memory available"
            )
            break
        workers = max(1, math.ceil(size / options.per_worker))
        progress(f"step {k + 1}/{len(targets)}: +{size:,} sockets ({workers} processes)")
        swarm = Swarm(
            Plan(
                mode="kefu",
                urls=cluster.urls,
                connections=size,
                workers=workers,
                secret=SECRET,
                sources=tuple(blocks[k]),
                tag=f"{tag}s{k}",
            )
        )
        swarms.append(swarm)
        before = cluster.snapshot()
        parts = swarm.connect(options.connect_timeout)
        time.sleep(options.settle_seconds)
        after_connect = cluster.snapshot()
        dropped = merge_counts(s.run(0.0, 0.0, 0.0, None).errors for s in idle)
        idle.append(swarm)
        time.sleep(options.idle_seconds)
        quiet = cluster.snapshot()
        probed = probe.run(probe_rate, options.probe_seconds, options.drain, None)
        clients = [pid for s in swarms for pid in s.pids]
        step = CapacityStep(
            target=target,
            requested=size,
            connected=sum(p.connected for p in parts),
            failed=sum(p.failed for p in parts),
            connect_seconds=max(p.seconds for p in parts),
            connect_errors=merge_counts(p.errors for p in parts),
            dropped=dropped,
            connecting=Figures.between(before, after_connect),
            idle=Figures.between(after_connect, quiet),
            client_rss_kb=sum(rss_kb(pid) or 0 for pid in clients),
            clients=sum(s.plan.connections for s in idle),
            probe=probed,
            available_kb=mem_available_kb(),
            log_errors=cluster.log_errors(),
        )
        step.stop = stop_reason(step, cluster.dead())
        results.steps.append(step)
        progress(capacity_brief(step, results.base_rss_kb))
        if step.stop:
            results.stop = f"at {target:,}: {step.stop}"
            break


def capacity_brief(step: CapacityStep, base: Sequence[int | None]) -> str:
    per_conn = node_kb_per_connection(step, base)
    p = step.probe
    return (
        f"{_num(step.total)} connected ({step.connected:,}/{step.requested:,} new in "
        f"{step.connect_seconds:.1f}s), node KiB/conn {_range(per_conn, 1)}, redis "
        f"{step.idle.redis_rate:,.0f} cmd/s idle, pg {step.idle.pg_rate:,.1f} xact/s idle, "
        f"nodes CPU idle {step.idle.nodes_cpu:.0%}, probe "
        f"{'-' if p is None else f'{p.delivered_total}/{p.sent}'} p99 "
        f"{'-' if p is None else f'{p.e2e.p99:.1f}'} ms"
        + (f"  <- {step.stop}" if step.stop else "")
    )


def node_kb_per_connection(step: CapacityStep, base: Sequence[int | None]) -> list[float]:
    """(RSS now - RSS before any idle socket) / connections, per node."""
    out = []
    for rss, rss0, conns in zip(
        step.idle.node_rss_kb, base, step.idle.node_connections, strict=True
    ):
        out.append(NAN if rss is None or rss0 is None or not conns else (rss - rss0) / conns)
    return out


# -- rendering ------------------------------------------------------------------------------------


def _num(value: float, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def _pct(cores: float) -> str:
    return "-" if math.isnan(cores) else f"{cores:.0%}"


def _range(values: Sequence[float], digits: int = 0) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "-"
    lo, hi = min(finite), max(finite)
    return (
        _num(lo, digits)
        if _num(lo, digits) == _num(hi, digits)
        else (f"{_num(lo, digits)}–{_num(hi, digits)}")
    )


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in errors.items()) or "0"


def _mib(kb: float | None) -> str:
    return "-" if kb is None or math.isnan(kb) else f"{kb / 1024:,.0f}"


STEP_HEADERS = (
    "offered/s",
    "acked/s",
    "delivered/s",
    "e2e p50 ms",
    "p99 ms",
    "p99.9 ms",
    "errors",
    "nodes CPU (each)",
    "Redis CPU",
    "PG CPU",
    "bench CPU",
    "other CPU",
    "idle CPU",
    "Redis cmd/s",
    "Redis cmd/delivered",
    "PG xact/s",
    "PG xact/acked",
    "store commits/s (msgs each)",
    "node RSS MiB (each)",
    "held",
)


def step_row(o: Observed) -> list[str]:
    s, fig = o.step, o.figures
    other = s.other_cpu - _zero(fig.redis_cpu) - _zero(fig.pg_cpu)
    reason = why_not(s)
    return [
        _num(s.offered),
        _num(s.ack_rate),
        _num(s.delivery_rate),
        _num(s.e2e.p50, 1),
        _num(s.e2e.p99, 1),
        _num(s.e2e.p999, 1),
        _errors(s.errors),
        f"{_pct(fig.nodes_cpu)} ({'/'.join(_pct(c) for c in fig.node_cpu)})",
        _pct(fig.redis_cpu),
        _pct(fig.pg_cpu),
        _pct(s.client_cpu),
        _pct(max(0.0, other)),
        _pct(idle_cores(s, fig.cpus)),
        _num(fig.redis_rate),
        _num(per(fig.redis_commands, s.delivered_total), 2),
        _num(fig.pg_rate),
        _num(per(fig.pg_commits, s.acked_total), 3),
        f"{_num(fig.store.commits / fig.seconds)} ({_num(fig.store.jobs_per_commit, 1)})",
        "/".join(_mib(kb) for kb in fig.node_rss_kb),
        "yes" if not reason else f"no: {reason}",
    ]


def idle_cores(step: Step, cpus: int) -> float:
    """The machine's cores left idle in ``step``: its CPUs less what every process used
    and what the hypervisor stole (a figure that could not be read counts as nothing)."""
    used = sum(_zero(v) for v in (step.server_cpu, step.client_cpu, step.other_cpu, step.steal))
    return max(0.0, cpus - used)


def _zero(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def _median_observed(observed: Sequence[Observed]) -> Observed | None:
    """The window whose p99 is the median one (for the per-command breakdown)."""
    if not observed:
        return None
    ranked = sorted(observed, key=lambda o: (math.isnan(o.step.e2e.p99), o.step.e2e.p99))
    return ranked[(len(ranked) - 1) // 2]


def breakdown_source(results: ClusterResults) -> tuple[Observed, str] | None:
    """The step whose Redis commands are broken down by command: the median latency
    window when those windows held, else the best held ladder step (an overloaded window
    shows the overload, not the cost of a message), else the median latency window."""
    mid = _median_observed(results.latency)
    if mid is not None and not why_not(mid.step):
        return mid, f"{mid.step.offered:,.0f} msg/s, the median window"
    best = results.saturation.best
    for o in results.ladder:
        if o.step is best:
            return o, f"{o.step.offered:,.0f} msg/s, the best held ladder step"
    if mid is not None:
        return mid, f"{mid.step.offered:,.0f} msg/s, the median window, overloaded"
    return None


def command_rows(o: Observed, limit: int = 12) -> list[list[str]]:
    """Redis calls per delivered message by command, most frequent first."""
    delivered = o.step.delivered_total
    fig = o.figures
    rows = [
        [name, f"{calls:,}", _num(per(calls, delivered), 3)]
        for name, calls in list(fig.redis_calls.items())[:limit]
    ]
    rows.append(["(all)", _num(fig.redis_commands), _num(per(fig.redis_commands, delivered), 3)])
    return rows


def delivery_line(o: Observed) -> str:
    fig, delivered = o.figures, o.step.delivered_total
    d = fig.deliveries
    kinds = ", ".join(
        f"{kind} {_num(per(n, delivered), 2)}" for kind, n in fig.redis_by_kind.items() if n
    )
    return (
        f"Per delivered message (nodes' /metrics over the same window): pushes handed to "
        f"another node {_num(per(d['remote'], delivered), 2)}, received from another node "
        f"{_num(per(d['received'], delivered), 2)}, local {_num(per(d['local'], delivered), 2)}; "
        f"publishes {_num(per(fig.publishes, delivered), 3)} ("
        f"{_num(per(d['remote'], fig.publishes), 1)} pushes each); delivery-path Redis "
        f"commands by kind: {kinds or '-'}; store: {_num(fig.store.commits)} group commits "
        f"of {_num(fig.store.jobs_per_commit, 1)} writes, {_num(fig.store.ms_per_commit, 1)} ms "
        f"each; PostgreSQL WAL {_num(per(fig.wal_bytes, o.step.acked_total))} bytes and "
        f"{_num(per(fig.pg_inserted, o.step.acked_total), 2)} inserted rows per acked message."
    )


def _targets(results: ClusterResults) -> list[list[str]]:
    rows = []
    best = results.best_rate
    sat = results.saturation
    through = results.held("throughput")
    rows.append(
        [
            f"persisted msg/s sustained, {results.options.nodes} nodes, sender and recipient "
            "on different nodes",
            f">= {THROUGHPUT_TARGET:,.0f}",
            f"{_num(best)} msg/s (best held ladder step {_num(sat.max_rate)}/s; "
            f"{_num(through.rate)}/s offered: median {_num(through.median_ack_rate)} acked/s, "
            f"p99 {_num(through.median_p99, 0)} ms)",
            "met" if best >= THROUGHPUT_TARGET else "NOT met",
        ]
    )
    held = results.held("latency")
    ok = (
        held.median_p99 <= SUSTAINED_P99_TARGET_MS
        and held.median_ack_rate >= HOLD_SHARE * held.rate
    )
    rows.append(
        [
            f"end-to-end p99 at {held.rate:,.0f} msg/s (cross-node)",
            f"<= {SUSTAINED_P99_TARGET_MS:.0f} ms",
            f"{_num(held.median_p99, 1)} ms (median of {len(held.windows)} windows; "
            f"{_num(held.median_ack_rate)} acked/s, p50 {_num(held.median_p50, 1)} ms)",
            "met" if ok else "NOT met",
        ]
    )
    return rows


def _about(results: ClusterResults | CapacityResults, command: str) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(results.started))
    minutes = (results.finished - results.started) / 60
    m = results.machine
    versions = ", ".join(f"{k} {v}" for k, v in results.versions.items()) or "servers given"
    return (
        f"Figures from `scripts/bench {command}` (`kefu bench {command}`), run {when}, "
        f"{minutes:.1f} minutes, on {m.get('cpus (nproc)', '?')} cpus "
        f"({m.get('cpu model', '?')}, {m.get('memory', '?')}), Python {m.get('python', '?')}, "
        f"{versions}.{_speed(m)} This section is rewritten by that command only; the other "
        "modes keep it."
    )


def _speed(m: dict[str, str]) -> str:
    """The host's speed around the run, as the probe measured it ("" when not probed)."""
    before, after = m.get(SPEED), m.get(SPEED_AFTER)
    if before is None:
        return ""
    then = f" and {after} s after" if after is not None else ""
    return (
        f" Host speed: a fixed Python loop took {before} s before the run{then} (lower is "
        "faster; on a shared machine it moves, and latency with it: compare runs only at a "
        "similar speed)."
    )


def cluster_text(results: ClusterResults) -> str:
    parts = [
        "ladder\n" + text_table(STEP_HEADERS, [step_row(o) for o in results.ladder]),
        f"sustained {results.options.rate:,.0f} msg/s\n"
        + text_table(STEP_HEADERS, [step_row(o) for o in results.latency]),
        f"sustained {results.options.target_rate:,.0f} msg/s\n"
        + text_table(STEP_HEADERS, [step_row(o) for o in results.throughput]),
    ]
    source = breakdown_source(results)
    if source is not None:
        mid, label = source
        parts.append(
            f"Redis calls per delivered message ({label})\n"
            + text_table(("command", "calls", "per delivered"), command_rows(mid))
        )
        parts.append(delivery_line(mid))
    parts.append(text_table(("target", "goal", "measured", ""), _targets(results)))
    return "\n\n".join(parts)


def cluster_markdown(results: ClusterResults, notes: Sequence[str] = ()) -> str:
    """The "Cluster" section of docs/benchmarks.md, between its markers."""
    o = results.options
    settings = ", ".join(f"`{k}={v}`" for k, v in results.node_settings.items()) or "none"
    doc = [
        CLUSTER_BEGIN,
        f"## Cluster ({o.nodes} nodes, Redis + PostgreSQL)",
        "",
        _about(results, "cluster"),
        "",
        "### Targets",
        "",
        md_table(("target", "goal", "measured", ""), _targets(results)),
        "",
        "### Method",
        "",
        "- **Cluster**: started the way `kefu cluster up` does (its code): a `redis-server` "
        "(no persistence), a PostgreSQL (`initdb` defaults: `fsync` and `synchronous_commit` "
        f"on), the migrations, then {o.nodes} nodes `python -m kefu serve --redis-url ... "
        "--database-url ...` on 127.0.0.1, each its own process (uvloop, heartbeats every "
        f"30 s); settings changed from the defaults: {settings}.",
        f"- **Load**: {o.sockets:,} client sockets (agents and customers, "
        f"{o.sockets // 2:,} 1:1 conversations opened by the agents), dealt round-robin over "
        "the nodes: connection 2p (the agent) goes to node 2p mod N and 2p + 1 (its customer) "
        "to the next node, so **every message is acked by the sender's node and pushed to "
        "the recipient by another node through Redis**. Both ends of a pair live in one "
        f"generator process (one clock; {generator_workers(o)} in all); generator as in the "
        "single-node run (its own minimal WebSocket client, open loop, paced every 2 ms, "
        "100-character texts).",
        "- **Latency**: end-to-end is the sender's send to the recipient's receive of the "
        "push (`perf_counter`, one process).",
        f"- **Ladder**: steps of {o.step_seconds:g} s "
        f"({', '.join(f'{r:,.0f}' for r in o.steps)} msg/s) after a "
        f"{o.warmup_seconds:g} s warm-up, until two steps in a row do not hold (held: >= "
        f"{HOLD_SHARE:.0%} acked in the step, nothing unacked {o.drain:g} s after, p99 <= "
        f"{HOLD_P99_MS:.0f} ms). Then {o.windows} windows of {o.window_seconds:g} s at "
        f"{o.rate:,.0f} msg/s (the latency target) and {o.windows} at {o.target_rate:,.0f} "
        f"msg/s (for the throughput target of {THROUGHPUT_TARGET:,.0f} acked/s: a window acks "
        "slightly less than it offers, as the acks of its last milliseconds come in the "
        "drain); medians reported. The throughput verdict is on acked msg/s.",
        "- **Per step** (its window and drain): *nodes CPU* utime+stime of each node "
        "process from /proc; *Redis CPU* `used_cpu_user + used_cpu_sys` from `INFO`; *PG "
        "CPU* the postmaster and its backends from /proc; *bench CPU* the generator; "
        "*other* the rest of the machine (the kernel's network work, other users: it is "
        "shared); *idle* the machine's cores left over. *Redis cmd/s* and "
        "*cmd/delivered*: `INFO` `total_commands_processed` delta over the step, divided by "
        "its seconds and by the pushes the recipients received (in the window and the "
        "drain); *PG xact/s*: `pg_stat_database.xact_commit` delta (reads included; "
        "PostgreSQL publishes these counters up to ~1 s late); *store commits*: the nodes' "
        "`kefu_store_batch_size` count delta and mean (group commits, the write "
        "transactions); *node RSS* at the step's end.",
        "",
        "### Ladder",
        "",
        md_table(STEP_HEADERS, [step_row(x) for x in results.ladder]),
        "",
        f"Best held step: **{_num(results.saturation.max_rate)} persisted msg/s** (stopped "
        f"by {results.saturation.stopped_by}).",
        "",
        f"### Sustained {o.rate:,.0f} msg/s",
        "",
        md_table(STEP_HEADERS, [step_row(x) for x in results.latency]),
        "",
        f"### Sustained {o.target_rate:,.0f} msg/s",
        "",
        md_table(STEP_HEADERS, [step_row(x) for x in results.throughput]),
    ]
    source = breakdown_source(results)
    if source is not None:
        mid, label = source
        doc += [
            "",
            f"### Redis commands per delivered message ({label})",
            "",
            md_table(("command", "calls", "per delivered message"), command_rows(mid)),
            "",
            delivery_line(mid),
        ]
    doc += ["", "### What limits it", "", *(_cluster_notes(results) + list(notes))]
    doc += [
        "",
        "### Reproduce",
        "",
        "```",
        "scripts/bench cluster                     # ~3 minutes, rewrites this section",
        "scripts/bench cluster --quick --no-doc    # a smoke run",
        "scripts/bench cluster --nodes 2 --sockets 2000 --rate 2000 --no-doc",
        "```",
        CLUSTER_END,
    ]
    return "\n".join(doc)


def _cluster_notes(results: ClusterResults) -> list[str]:
    notes = []
    sat = results.saturation
    best = sat.best
    for label, o in (
        ("best held ladder step", next((x for x in results.ladder if x.step is best), None)),
        (
            "last ladder step",
            results.ladder[-1] if results.ladder and results.ladder[-1].step is not best else None,
        ),
    ):
        if o is None:
            continue
        s, fig = o.step, o.figures
        acked = s.acked_total or 1
        notes.append(
            f"- **At the {label}** ({_num(s.offered)} msg/s offered, {_num(s.ack_rate)} "
            f"acked/s): nodes {_pct(fig.nodes_cpu)} of one core together "
            f"({'/'.join(_pct(c) for c in fig.node_cpu)}), Redis {_pct(fig.redis_cpu)}, "
            f"PostgreSQL {_pct(fig.pg_cpu)}, generator {_pct(s.client_cpu)}, other "
            f"{_pct(max(0.0, s.other_cpu - _zero(fig.redis_cpu) - _zero(fig.pg_cpu)))}. "
            f"CPU per persisted message: nodes {_num(fig.nodes_cpu * fig.seconds / acked * 1e6)}"
            f" µs, Redis {_num(_zero(fig.redis_cpu) * fig.seconds / acked * 1e6)} µs, "
            f"PostgreSQL {_num(_zero(fig.pg_cpu) * fig.seconds / acked * 1e6)} µs"
            + (f"; why it did not hold: {why_not(s)}." if why_not(s) else ".")
        )
    if results.latency:
        o = sorted(results.latency, key=lambda x: x.step.e2e.p99)[len(results.latency) // 2]
        s, fig = o.step, o.figures
        used = fig.cpus - idle_cores(s, fig.cpus)
        known = fig.nodes_cpu + _zero(fig.pg_cpu) + s.client_cpu + _zero(fig.redis_cpu)
        notes.append(
            f"- **At {_num(results.options.rate)} msg/s** (the median latency window, p99 "
            f"{_num(s.e2e.p99, 1)} ms): the machine's {fig.cpus} cores were "
            f"{_pct(used / fig.cpus)} busy (nodes {_pct(fig.nodes_cpu)} of one core, "
            f"PostgreSQL {_pct(fig.pg_cpu)}, generator {_pct(s.client_cpu)}, Redis "
            f"{_pct(fig.redis_cpu)}, the rest {_pct(max(0.0, used - known))}):"
            " a message waits for a CPU at every one of its hops (generator, node, "
            "PostgreSQL, node, Redis, node, generator), so the tail grows with the busy share."
        )
    return notes


# -- capacity rendering ----------------------------------------------------------------------------

CAPACITY_HEADERS = (
    "step",
    "up (clients)",
    "connected (nodes)",
    "new connected/asked",
    "connect s",
    "conn/s",
    "per node",
    "node RSS MiB (mean)",
    "node KiB/conn",
    "nodes CPU connecting",
    "nodes CPU idle",
    "Redis cmd/s connecting",
    "Redis cmd/s idle",
    "Redis MiB",
    "PG xact/s connecting",
    "PG xact/s idle",
    "bench KiB/conn",
    "probe delivered",
    "probe p99 ms",
    "available GiB",
    "passed",
)


def capacity_row(step: CapacityStep, base: Sequence[int | None], up: int) -> list[str]:
    idle, conn = step.idle, step.connecting
    rss = [kb for kb in idle.node_rss_kb if kb is not None]
    p = step.probe
    unreachable = sum(1 for c in idle.node_connections if math.isnan(c))
    return [
        f"{step.target:,}",
        f"{up:,}",
        _num(step.total) if not unreachable else f"- (/metrics of {unreachable} nodes unreachable)",
        f"{step.connected:,}/{step.requested:,}",
        _num(step.connect_seconds, 1),
        _num(per(step.connected, step.connect_seconds)),
        _range(idle.node_connections),
        _mib(sum(rss) / len(rss) if rss else NAN),
        _range(node_kb_per_connection(step, base), 1),
        _pct(conn.nodes_cpu),
        _pct(idle.nodes_cpu),
        _num(conn.redis_rate),
        _num(idle.redis_rate),
        _mib(idle.redis_memory / 1024),
        _num(conn.pg_rate, 1),
        _num(idle.pg_rate, 1),
        _num(per(step.client_rss_kb, step.clients), 1),
        "-" if p is None else f"{p.delivered_total}/{p.sent}",
        "-" if p is None else _num(p.e2e.p99, 1),
        "-" if step.available_kb is None else f"{step.available_kb / 1024 / 1024:.1f}",
        "yes" if not step.stop else f"no: {step.stop}",
    ]


def _capacity_target(results: CapacityResults) -> list[list[str]]:
    o = results.options
    reached = results.reached
    return [
        [
            f"concurrent connections, {o.nodes} nodes, heartbeats on, cross-node delivery "
            "still working",
            f">= {o.target:,}",
            _num(reached) + (f" (stopped {results.stop})" if results.stop else ""),
            "met" if reached >= o.target else "NOT met",
        ]
    ]


def capacity_text(results: CapacityResults) -> str:
    rows = [capacity_row(s, results.base_rss_kb, results.up(s)) for s in results.steps]
    return "\n\n".join(
        [
            text_table(CAPACITY_HEADERS, rows),
            f"stopped: {results.stop or 'no: every step passed'}",
            text_table(("target", "goal", "measured", ""), _capacity_target(results)),
        ]
    )


def capacity_markdown(results: CapacityResults, notes: Sequence[str] = ()) -> str:
    """The "Cluster connection capacity" section of docs/benchmarks.md."""
    o = results.options
    settings = ", ".join(f"`{k}={v}`" for k, v in results.node_settings.items()) or "none"
    last = results.good[-1] if results.good else None
    doc = [
        CAPACITY_BEGIN,
        "## Cluster connection capacity",
        "",
        _about(results, "cluster --connections"),
        "",
        "### Target",
        "",
        md_table(("target", "goal", "measured", ""), _capacity_target(results)),
        "",
        "### Method",
        "",
        f"- **Cluster**: Redis, PostgreSQL and {o.nodes} nodes as in the section above; "
        f"settings changed from the defaults: {settings}. Heartbeats on (the node pings "
        "every connection every 30 s, the client answers); the open-file hard limit here is "
        f"{hard_nofile():,} per process, for the nodes and the generator alike.",
        f"- **Steps**: idle connections are added {o.step:,} at a time up to {o.target:,}, "
        f"each step by new generator processes of at most {o.per_worker:,} sockets, bound to "
        f"source addresses 127.0.0.3, ... ({PER_ADDRESS:,} sockets each); the sockets are "
        "dealt round-robin over the nodes, each authenticates (`hello`) and does one ping "
        "round trip. Every connection is a distinct user (presence in Redis).",
        f"- **At each step**: *connecting* figures cover the connect phase (plus "
        f"{o.settle_seconds:g} s); then a quiet window of {o.idle_seconds:g} s: *idle* "
        "nodes CPU (heartbeats, timers), Redis commands/s, PostgreSQL transactions/s. "
        "*Node KiB/conn*: (node RSS now - its RSS before any idle socket) / connections on "
        "that node (range over nodes). *Bench KiB/conn*: RSS of every generator process / "
        f"sockets. *Probe*: {o.nodes} pairs with agent and customer on different nodes "
        f"(opened at the start) send {o.probe_rate or 4.0 * o.nodes:g} msg/s for "
        f"{o.probe_seconds:g} s; every message must be acked and delivered. *Connected*: "
        "the nodes' `websocket_connections_total` gauges summed (the probe's sockets "
        "included); *up*: the generator's sockets that came up.",
        "- **A step passes** when every new connection came up, no earlier connection was "
        "dropped, every probe message was acked and delivered, and no node died. The run "
        "stops at the first step that does not pass (or when less than 2 GiB of memory "
        "is left).",
        "",
        "### Steps",
        "",
        md_table(
            CAPACITY_HEADERS,
            [capacity_row(s, results.base_rss_kb, results.up(s)) for s in results.steps],
        ),
        "",
        f"Stopped: **{results.stop or 'no: every step passed'}**.",
    ]
    if last is not None:
        per_conn = node_kb_per_connection(last, results.base_rss_kb)
        rows = [
            [
                f"node-{i}",
                _num(last.idle.node_connections[i]),
                _mib(last.idle.node_rss_kb[i] or NAN),
                _mib(results.base_rss_kb[i] or NAN),
                _num(per_conn[i], 1),
                _pct(last.idle.node_cpu[i]),
            ]
            for i in range(len(per_conn))
        ]
        doc += [
            "",
            f"Per node at the last passing step ({_num(last.total)} connections):",
            "",
            md_table(
                (
                    "node",
                    "connections",
                    "RSS MiB",
                    "RSS before MiB",
                    "KiB/connection",
                    "CPU idle",
                ),
                rows,
            ),
        ]
    if notes:
        doc += ["", *notes]
    doc += [
        "",
        "### Reproduce",
        "",
        "```",
        "scripts/bench cluster --connections       # 150,000 in steps of 25,000 (~8 minutes)",
        "scripts/bench cluster --connections 12000 --conn-step 4000 --nodes 3 --no-doc",
        "```",
        CAPACITY_END,
    ]
    return "\n".join(doc)
