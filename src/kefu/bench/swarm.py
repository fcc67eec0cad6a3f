"""The parent's side of the load generator: plans the sockets, starts the workers, and
merges what they report.

Connection ``i`` (agents even, customers odd) goes to node ``urls[i % len(urls)]`` from
source address ``sources[i % len(sources)]``; pair ``p`` runs in worker ``p % workers``.
With two nodes every pair is therefore cross-node: agents on one, customers on the other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TypeVar

from kefu.bench import commands as c
from kefu.bench import worker
from kefu.bench.procfs import CpuMeter, Pids
from kefu.bench.stats import (
    Latency,
    merge_counts,
    source_addresses,
    split_rate,
    spread,
    worker_of_pair,
)

R = TypeVar("R", bound=c.Result)


class WorkerError(RuntimeError):
    """A worker failed a command, died, or did not answer in time."""


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    mode: c.Mode
    urls: tuple[str, ...]
    connections: int
    workers: int
    secret: str
    compress: int = 0
    text_size: int = 100
    sources: tuple[str, ...] = ()
    tag: str = "b"

    @property
    def pairs(self) -> int:
        return self.connections // 2


def _endpoint(plan: Plan, sources: Sequence[str], pair: int, index: int, role: str) -> c.Endpoint:
    letter = "a" if role == "agent" else "c"
    return c.Endpoint(
        index=index,
        user=f"{plan.tag}-{letter}{pair}",
        role=role,
        url=spread(index, plan.urls),
        source=spread(index, sources),
    )


def build_specs(plan: Plan) -> list[c.WorkerSpec]:
    """Deal the pairs of ``plan`` to its workers."""
    sources = list(plan.sources) or source_addresses(plan.connections)
    per_worker: list[list[c.Pair]] = [[] for _ in range(plan.workers)]
    for p in range(plan.pairs):
        pair = c.Pair(
            agent=_endpoint(plan, sources, p, 2 * p, "agent"),
            customer=_endpoint(plan, sources, p, 2 * p + 1, "customer"),
        )
        per_worker[worker_of_pair(p, plan.workers)].append(pair)
    return [
        c.WorkerSpec(
            worker=w,
            mode=plan.mode,
            pairs=tuple(pairs),
            secret=plan.secret,
            compress=plan.compress,
            text_size=plan.text_size,
            tag=plan.tag,
        )
        for w, pairs in enumerate(per_worker)
    ]


@dataclasses.dataclass(slots=True)
class Step:
    """One :class:`~kefu.bench.commands.Run` merged over every worker."""

    offered: float
    duration: float
    sent: int
    skipped: int
    acked: int
    delivered: int
    unacked: int
    undelivered: int
    ack: Latency
    e2e: Latency
    errors: dict[str, int]
    reconnects: int
    #: Acks and pushes received in the window and in the drain after it.
    acked_total: int = 0
    delivered_total: int = 0
    server_cpu: float = float("nan")
    client_cpu: float = float("nan")
    other_cpu: float = float("nan")
    steal: float = float("nan")

    @property
    def sent_rate(self) -> float:
        return self.sent / self.duration

    @property
    def ack_rate(self) -> float:
        return self.acked / self.duration

    @property
    def delivery_rate(self) -> float:
        return self.delivered / self.duration


def merge_steps(offered: float, parts: Sequence[c.StepResult]) -> Step:
    duration = max(p.duration for p in parts)
    return Step(
        offered=offered,
        duration=duration,
        sent=sum(p.sent for p in parts),
        skipped=sum(p.skipped for p in parts),
        acked=sum(p.acked for p in parts),
        delivered=sum(p.delivered for p in parts),
        unacked=sum(p.unacked for p in parts),
        undelivered=sum(p.undelivered for p in parts),
        ack=Latency.of(x for p in parts for x in p.ack_latency),
        e2e=Latency.of(x for p in parts for x in p.e2e_latency),
        errors=merge_counts(p.errors for p in parts),
        reconnects=sum(p.reconnects for p in parts),
        acked_total=sum(p.acked_total for p in parts),
        delivered_total=sum(p.delivered_total for p in parts),
    )


class Swarm:
    """Worker processes, started together and commanded together."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.specs = build_specs(plan)
        ctx = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._procs: list[BaseProcess] = []
        for spec in self.specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker.main, args=(child, spec), name=f"kefu-bench-{spec.worker}"
            )
            proc.start()
            child.close()
            self._pipes.append(parent)
            self._procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def _call(self, commands: Sequence[c.Command], timeout: float, kind: type[R]) -> list[R]:
        for pipe, command in zip(self._pipes, commands, strict=True):
            pipe.send(command)
        deadline = time.monotonic() + timeout
        out: list[R] = []
        for w, pipe in enumerate(self._pipes):
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise WorkerError(f"worker {w} did not answer within {timeout:.0f}s")
            try:
                result = pipe.recv()
            except EOFError as exc:
                raise WorkerError(f"worker {w} died") from exc
            if isinstance(result, c.Failed):
                raise WorkerError(f"worker {w} failed:\n{result.error}")
            if not isinstance(result, kind):
                raise WorkerError(f"worker {w} answered {type(result).__name__}")
            out.append(result)
        return out

    def connect(self, timeout: float) -> list[c.ConnectResult]:
        cmd = c.Connect(timeout=timeout)
        return self._call([cmd] * len(self._pipes), timeout + 15, c.ConnectResult)

    def open(self, timeout: float) -> list[c.OpenResult]:
        cmd = c.Open(timeout=timeout)
        return self._call([cmd] * len(self._pipes), timeout + 15, c.OpenResult)

    def run(self, rate: float, duration: float, drain: float, server_pid: Pids) -> Step:
        rates = split_rate(rate, [len(s.pairs) for s in self.specs])
        cmds = [c.Run(rate=r, duration=duration, drain=drain) for r in rates]
        meter = CpuMeter(server_pid, self.pids)
        parts = self._call(cmds, duration + drain + 30, c.StepResult)
        step = merge_steps(rate, parts)
        step.server_cpu, step.client_cpu, step.other_cpu, step.steal = meter.read()
        return step

    def close(self) -> None:
        with contextlib.suppress(WorkerError):
            self._call([c.Close()] * len(self._pipes), 30, c.Closed)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for pipe in self._pipes:
            pipe.close()

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
