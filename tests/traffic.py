"""Live chat traffic from SDK clients, and the accounting that says whether anything was lost.

Used by the failure tests with real node processes (tests/integration/test_cluster_failures.py):

* :class:`TrafficClient` is :class:`kefu.client.Client` with two test-local additions and no
  change to its behaviour: on every *re*connect it takes the next URL of a list (a tiny
  round-robin load balancer: the SDK itself connects to one URL), and it records what it
  sees (pushes, notices, retryable errors, acks, close codes, the node of each connection).
* :class:`Traffic` runs customer/agent pairs, each in its own conversation (opened by the
  agent), each client sending at a steady rate with several sends in flight, and a reader
  per client consuming :meth:`Client.messages` (the application's view, after the SDK's
  dedupe).
* :meth:`Traffic.verify` reads every conversation's history from 0 with a fresh client
  and counts sent / acked / stored / delivered / lost / duplicated / undelivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from kefu.client import Backoff, Client
from kefu.errors import RemoteError
from kefu.protocol import frames as f
from tests.conftest import token


class TrafficClient(Client):
    """An SDK client that reconnects round-robin over ``urls`` and records what it sees."""

    def __init__(
        self, urls: Sequence[str], home: int, user_id: str, role: str, **kwargs: Any
    ) -> None:
        kwargs.setdefault("backoff", Backoff(0.05, 1.0))
        kwargs.setdefault("request_timeout", 5.0)
        super().__init__(urls[home], user_id, token(user_id, role), **kwargs)
        self.urls = list(urls)
        self._turn = home
        self._opened = False
        #: Node id of every connection, in order (``hello.node``).
        self.nodes: list[str] = []
        #: (monotonic time, message) of every message pushed (not synced) to this client.
        self.pushes: list[tuple[float, f.Message]] = []
        #: (monotonic time, code) of every ``notice`` (``resync``, ``draining``).
        self.notices: list[tuple[float, str]] = []
        #: (monotonic time, op, code, retryable) of every error frame answering a request.
        self.errors: list[tuple[float, str, str, bool]] = []
        #: (monotonic time, ack) of every ack received (resends included).
        self.ack_log: list[tuple[float, f.Ack]] = []
        #: What the application got from :meth:`messages`, in order.
        self.delivered: list[f.Message] = []

    async def _open(self) -> None:
        if self._opened:  # a reconnect: the next node, as a round-robin balancer would
            self._turn += 1
        self.url = self.urls[self._turn % len(self.urls)]
        await super()._open()
        self._opened = True
        assert self.hello is not None
        self.nodes.append(self.hello.node)

    def _dispatch(self, event: f.ServerEvent) -> None:
        now = time.monotonic()
        if isinstance(event, f.Message):  # replies carry messages in f.Messages, not here
            self.pushes.append((now, event))
        elif isinstance(event, f.Notice):
            self.notices.append((now, event.code))
        elif isinstance(event, f.Ack):
            self.ack_log.append((now, event))
        super()._dispatch(event)

    async def _request(self, frame: f.ClientRequest) -> Any:
        try:
            return await super()._request(frame)
        except RemoteError as exc:
            op = type(frame).__name__.lower()
            self.errors.append((time.monotonic(), op, exc.raw_code, exc.retryable))
            raise

    @property
    def node(self) -> str:
        return self.nodes[-1] if self.nodes else ""


@dataclasses.dataclass
class Pair:
    customer: TrafficClient
    agent: TrafficClient
    conv: str = ""

    @property
    def clients(self) -> tuple[TrafficClient, TrafficClient]:
        return self.customer, self.agent


@dataclasses.dataclass
class Sent:
    client: str
    conv: str
    cmid: str
    at: float
    ack: f.Ack | None = None
    acked_at: float | None = None
    error: str | None = None


@dataclasses.dataclass
class Report:
    sent: int
    acked: int
    failed: int
    stored: int
    delivered: int
    lost: int
    duplicated: int
    undelivered: int
    gaps: list[str]
    details: list[str]

    def line(self, name: str, **extra: object) -> str:
        fields = " ".join(f"{k}={v}" for k, v in extra.items())
        return (
            f"[{name}] sent={self.sent} acked={self.acked} failed={self.failed} "
            f"stored={self.stored} delivered={self.delivered} lost={self.lost} "
            f"duplicated={self.duplicated} undelivered={self.undelivered} {fields}"
        ).rstrip()


class Traffic:
    """Customer/agent pairs chatting at ``rate`` messages per second in total."""

    def __init__(self, urls: Sequence[str], *, rate: float = 40.0, inflight: int = 4) -> None:
        self.urls = list(urls)
        self.rate = rate
        self.inflight = inflight
        self.pairs: list[Pair] = []
        self.sent: dict[str, Sent] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._senders: list[asyncio.Task[None]] = []
        self._sends: set[asyncio.Future[f.Ack | None]] = set()
        self._probes = itertools.count(1)

    @property
    def clients(self) -> list[TrafficClient]:
        return [c for p in self.pairs for c in p.clients]

    async def add_pair(self, name: str, customer_home: int, agent_home: int) -> Pair:
        """Connect ``cust-NAME`` and ``agent-NAME`` to their home nodes; the agent opens."""
        pair = Pair(
            TrafficClient(self.urls, customer_home, f"cust-{name}", "customer"),
            TrafficClient(self.urls, agent_home, f"agent-{name}", "agent"),
        )
        await pair.customer.connect()
        await pair.agent.connect()
        pair.conv = (await pair.agent.open(customer_id=pair.customer.user_id)).conv
        self.pairs.append(pair)
        for client in pair.clients:
            self._tasks.append(asyncio.ensure_future(self._read(client)))
        return pair

    def start(self, pairs: Sequence[Pair] | None = None) -> None:
        """Start sending from every client of ``pairs`` (default: all)."""
        for pair in pairs if pairs is not None else self.pairs:
            for client in pair.clients:
                self._senders.append(asyncio.ensure_future(self._send_loop(client, pair.conv)))

    async def _read(self, client: TrafficClient) -> None:
        async for message in client.messages():
            client.delivered.append(message)

    async def _send_loop(self, client: TrafficClient, conv: str) -> None:
        interval = max(8, len(self.clients)) / self.rate  # seconds between this one's sends
        busy: set[asyncio.Future[f.Ack | None]] = set()
        for i in itertools.count():
            if self._stop.is_set():
                return
            if len(busy) < self.inflight:
                task = asyncio.ensure_future(self.send(client, conv, f"{client.user_id}-{i}"))
                busy.add(task)
                self._sends.add(task)
                task.add_done_callback(busy.discard)
                task.add_done_callback(self._sends.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)

    async def send(self, client: TrafficClient, conv: str, cmid: str) -> f.Ack | None:
        record = Sent(client.user_id, conv, cmid, time.monotonic())
        self.sent[cmid] = record
        try:
            ack = await client.send(conv, f"text of {cmid}", client_msg_id=cmid)
        except Exception as exc:  # gave up: never acked, which is allowed
            record.error = repr(exc)
            return None
        record.ack, record.acked_at = ack, time.monotonic()
        return ack

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop sending; wait for the sends in flight to be acked or to give up."""
        self._stop.set()
        await asyncio.gather(*self._senders)
        if self._sends:
            _, pending = await asyncio.wait(set(self._sends), timeout=timeout)
            for task in pending:
                task.cancel()

    async def probe(self, timeout: float = 5.0) -> list[str]:
        """Each client sends one message; its peer must get it as a push (not a sync).

        Returns what failed (empty when every push went through), e.g. after a fault:
        "pushes flow again".
        """

        async def one(sender: TrafficClient, receiver: TrafficClient, conv: str) -> str | None:
            ack = await self.send(sender, conv, f"{sender.user_id}-probe-{next(self._probes)}")
            if ack is None:
                return f"{sender.user_id}: probe not acked"
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if any(m.msg_id == ack.msg_id for _, m in receiver.pushes):
                    return None
                await asyncio.sleep(0.02)
            return (
                f"{sender.user_id}@{sender.node} -> {receiver.user_id}@{receiver.node}: "
                f"seq {ack.seq} not pushed within {timeout}s"
            )

        results = await asyncio.gather(
            *(
                one(s, r, p.conv)
                for p in self.pairs
                for s, r in ((p.customer, p.agent), (p.agent, p.customer))
            )
        )
        return [r for r in results if r is not None]

    async def history(self, url: str) -> dict[str, list[f.Message]]:
        """Every conversation from seq 0, read by a fresh admin client."""
        reader = Client(url, "auditor", token("auditor", "admin"), backoff=Backoff(0.05, 0.5))
        out: dict[str, list[f.Message]] = {}
        async with reader:
            for pair in self.pairs:
                messages: list[f.Message] = []
                after = 0
                while True:
                    page = await reader.request(
                        f.Sync(conv=pair.conv, after_seq=after, limit=200), retry=True
                    )
                    assert isinstance(page, f.Messages)
                    messages.extend(page.messages)
                    if not page.has_more or not page.messages:
                        break
                    after = page.messages[-1].seq
                out[pair.conv] = messages
        return out

    async def verify(self, url: str, *, deliver_timeout: float = 5.0) -> Report:
        """Compare what was acked, stored and delivered (call after :meth:`stop`)."""
        stored = await self.history(url)
        details: list[str] = []
        gaps: list[str] = []
        for conv, messages in stored.items():
            seqs = [m.seq for m in messages]
            if seqs != list(range(1, len(seqs) + 1)):
                gaps.append(f"{conv}: seqs {seqs[:5]}...{seqs[-5:]} are not 1..{len(seqs)}")
            keys = Counter((m.sender, m.client_msg_id) for m in messages if m.client_msg_id)
            twice = [k for k, n in keys.items() if n > 1]
            if twice:
                gaps.append(f"{conv}: client_msg_id stored twice: {twice[:3]}")
        by_seq = {(m.conv, m.seq): m for ms in stored.values() for m in ms}
        acked = [s for s in self.sent.values() if s.ack is not None]
        lost = 0
        for s in acked:
            assert s.ack is not None
            message = by_seq.get((s.ack.conv, s.ack.seq))
            if (
                message is None
                or message.msg_id != s.ack.msg_id
                or message.client_msg_id != s.cmid
                or message.sender != s.client
            ):
                lost += 1
                details.append(f"lost: {s.cmid} acked as {s.ack.conv}/{s.ack.seq}")
        # Every client's application must end up with its whole conversation.
        last = {conv: (ms[-1].seq if ms else 0) for conv, ms in stored.items()}
        deadline = time.monotonic() + deliver_timeout
        while time.monotonic() < deadline:
            if all(
                c.last_seq.get(p.conv, 0) >= last[p.conv] for p in self.pairs for c in p.clients
            ):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # anything delivered twice shows up now
        delivered = duplicated = undelivered = 0
        for pair in self.pairs:
            expected = {m.seq for m in stored[pair.conv]}
            for client in pair.clients:
                got = [m for m in client.delivered if m.conv == pair.conv]
                seq_counts = Counter(m.seq for m in got)
                id_counts = Counter(m.msg_id for m in got)
                dup = sum(n - 1 for n in seq_counts.values()) + sum(
                    n - 1 for n in id_counts.values()
                )
                if dup:
                    duplicated += dup
                    details.append(f"duplicated: {client.user_id} got seqs twice")
                delivered += sum(1 for m in got if m.sender not in (client.user_id, "system"))
                missing = expected - set(seq_counts)
                if missing:
                    undelivered += len(missing)
                    details.append(
                        f"undelivered: {client.user_id} misses seqs {sorted(missing)[:10]}"
                    )
        return Report(
            sent=len(self.sent),
            acked=len(acked),
            failed=sum(1 for s in self.sent.values() if s.error is not None),
            stored=sum(1 for ms in stored.values() for m in ms if m.type == "text"),
            delivered=delivered,
            lost=lost,
            duplicated=duplicated,
            undelivered=undelivered,
            gaps=gaps,
            details=details,
        )

    async def close(self) -> None:
        self._stop.set()
        for task in list(self._sends):
            task.cancel()
        for client in self.clients:
            await client.close()
        for loop in [*self._tasks, *self._senders]:
            loop.cancel()
        await asyncio.gather(*self._tasks, *self._senders, *self._sends, return_exceptions=True)

    def errors(self) -> Counter[str]:
        return Counter(f"{op}:{code}" for c in self.clients for _, op, code, _r in c.errors)
