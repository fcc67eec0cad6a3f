"""The reference documents name everything the code can say."""

from __future__ import annotations

import typing
from pathlib import Path

from kefu.errors import ErrorCode
from kefu.lifecycle import Event
from kefu.protocol import frames as f

DOCS = Path(__file__).resolve().parents[2] / "docs"
PROTOCOL = (DOCS / "protocol.md").read_text()
OPERATIONS = (DOCS / "operations.md").read_text()


def test_every_error_code_is_documented() -> None:
    for code in ErrorCode:
        assert f"| `{code.value}` |" in PROTOCOL, code


def test_every_client_op_is_documented() -> None:
    for cls in typing.get_args(f.ClientRequest):
        op = cls.__struct_config__.tag
        assert f"### {op}" in PROTOCOL or f"| `{op}` |" in PROTOCOL, op


def test_every_server_frame_is_documented() -> None:
    for cls in typing.get_args(f.ServerEvent):
        op = cls.__struct_config__.tag
        assert f"### {op}" in PROTOCOL or f"#### {op}" in PROTOCOL, op


def test_every_lifecycle_event_is_documented() -> None:
    for event in Event:
        assert f"`{event.value}`" in PROTOCOL, event


def test_every_metric_is_documented() -> None:
    from kefu.metrics import Metrics

    metrics = Metrics()
    for metric in metrics.registry.collect():
        assert f"`{metric.name}" in OPERATIONS or f"`{metric.name}_total" in OPERATIONS, metric.name
