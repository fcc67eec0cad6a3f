"""What the parent and the worker processes say to each other over their pipes.

Every value is a small picklable dataclass. The parent sends a command; the worker runs
it to the end (each command is bounded in time) and answers with one result.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Mode = Literal["kefu", "echo"]


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    """One client socket to open: who, where to, and from which source address."""

    index: int
    user: str
    role: str
    url: str
    source: str


@dataclasses.dataclass(frozen=True, slots=True)
class Pair:
    """An agent and a customer: the agent opens their conversation, both send in it."""

    agent: Endpoint
    customer: Endpoint


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSpec:
    worker: int
    mode: Mode
    pairs: tuple[Pair, ...]
    secret: str
    compress: int
    text_size: int = 100
    connect_concurrency: int = 64
    tag: str = "b"


# -- commands -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Connect:
    """Open every socket, wait for hello, then do one ping round trip on each."""

    timeout: float


@dataclasses.dataclass(frozen=True, slots=True)
class Open:
    """Agents open one conversation per pair (kefu mode only)."""

    timeout: float


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """Send ``rate`` messages a second for ``duration`` s, then wait up to ``drain`` s."""

    rate: float
    duration: float
    drain: float


@dataclasses.dataclass(frozen=True, slots=True)
class Close:
    timeout: float = 10.0


Command = Connect | Open | Run | Close

# -- results ------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class ConnectResult:
    connected: int
    failed: int
    seconds: float
    errors: dict[str, int]
    rtt: list[float]


@dataclasses.dataclass(slots=True)
class OpenResult:
    opened: int
    failed: int
    seconds: float
    errors: dict[str, int]


@dataclasses.dataclass(slots=True)
class StepResult:
    """One worker's view of one :class:`Run`."""

    duration: float
    sent: int
    skipped: int
    acked: int
    delivered: int
    acked_total: int
    delivered_total: int
    unacked: int
    undelivered: int
    ack_latency: list[float]
    e2e_latency: list[float]
    errors: dict[str, int]
    reconnects: int


@dataclasses.dataclass(slots=True)
class Closed:
    closed: int


@dataclasses.dataclass(slots=True)
class Failed:
    """The worker could not run a command."""

    error: str


Result = ConnectResult | OpenResult | StepResult | Closed | Failed
