"""The writer's wire type for a stored message mirrors the domain record field for field."""

from __future__ import annotations

import dataclasses

import msgspec

from kefu.model import StoredMessage
from kefu.store.sqlite_writer import Stored


def test_stored_mirrors_stored_message() -> None:
    assert Stored.__struct_fields__ == tuple(f.name for f in dataclasses.fields(StoredMessage))
    wire = Stored("c", 1, "m", "u", "customer", "k", "text", b"{}", 5, duplicate=True)
    assert StoredMessage(*msgspec.structs.astuple(wire)) == StoredMessage(
        conv="c",
        seq=1,
        msg_id="m",
        sender="u",
        sender_role="customer",
        client_msg_id="k",
        type="text",
        body=b"{}",
        ts=5,
        duplicate=True,
    )
