"""Past max_pending_writes the node pushes back with `overloaded`; nothing is lost."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from kefu.server import Server
from tests.conftest import RawClient, make_config, open_conversation, token


async def test_overloaded_pushback(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    srv = Server(
        make_config(tmp_path / "data", max_pending_writes=2, rate_per_second=1000, rate_burst=1000)
    )
    await srv.start()
    try:
        agent = RawClient(
            await http.ws_connect(f"{srv.url}/ws?user_id=ag&token={token('ag', 'agent')}")
        )
        customer = RawClient(await http.ws_connect(f"{srv.url}/ws?user_id=cu&token={token('cu')}"))
        await agent.recv_op("hello")
        await customer.recv_op("hello")
        conv = await open_conversation(agent, "cu")
        total = 200
        for n in range(total):  # pipelined: no waiting for acks
            await customer.ws.send_str(
                json.dumps(
                    {
                        "op": "send",
                        "id": n,
                        "conv": conv,
                        "client_msg_id": f"m{n}",
                        "type": "text",
                        "body": {"text": f"n{n}"},
                    }
                )
            )
        acked: dict[int, int] = {}
        refused: list[dict[str, object]] = []
        while len(acked) + len(refused) < total:
            frame = await customer.recv()
            if frame["op"] == "ack":
                acked[frame["id"]] = frame["seq"]
            elif frame["op"] == "error":
                refused.append(frame)
        assert refused, "expected some sends to be refused with overloaded"
        assert {f["code"] for f in refused} == {"overloaded"}
        assert all(f["retryable"] is True and f["retry_after"] for f in refused)
        # Everything acked is stored, with seqs 1..n in order of sending.
        page = await customer.request(
            {"op": "sync", "id": "s", "conv": conv, "after_seq": 0, "limit": 1000}
        )
        stored = [(m["client_msg_id"], m["seq"]) for m in page["messages"]]
        assert stored == sorted(((f"m{i}", s) for i, s in acked.items()), key=lambda x: x[1])
        assert [s for _, s in stored] == list(range(1, len(acked) + 1))
        # The node recovers at once: a refused message resent now is stored.
        again = await customer.request(
            {
                "op": "send",
                "id": "again",
                "conv": conv,
                "client_msg_id": "late",
                "type": "text",
                "body": {"text": "late"},
            }
        )
        assert again["op"] == "ack" and again["seq"] == len(acked) + 1
    finally:
        await srv.stop()
