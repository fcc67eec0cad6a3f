"""Reports over a time range, per skill group and per agent, as JSON rows or CSV.

The figures come from each conversation's lifecycle stamps, which the store sets in the
same transaction as the events they record, so a report always agrees with the history:

* ``wait``: created -> first assigned (conversations that were assigned);
* ``first_response``: created -> the agent's first public reply;
* ``resolution``: created -> resolved (conversations that were resolved);
* ``abandoned``: closed without ever being assigned; the rate is over all conversations;
* ``csat``: the average score of the rated ones.

A conversation counts in the range when it was created in it; per agent it counts for the
agent who held it last.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterable

import msgspec

from kefu.model import Conversation, ConversationState

COLUMNS = (
    "key",
    "conversations",
    "assigned",
    "resolved",
    "abandoned",
    "abandonment_rate",
    "wait_avg_s",
    "wait_median_s",
    "first_response_avg_s",
    "first_response_median_s",
    "resolution_avg_s",
    "resolution_median_s",
    "csat_count",
    "csat_avg",
)


class ReportRow(msgspec.Struct, frozen=True):
    """One group's or agent's figures (also the REST API's report row)."""

    key: str
    conversations: int
    assigned: int
    resolved: int
    abandoned: int
    abandonment_rate: float
    wait_avg_s: float | None
    wait_median_s: float | None
    first_response_avg_s: float | None
    first_response_median_s: float | None
    resolution_avg_s: float | None
    resolution_median_s: float | None
    csat_count: int
    csat_avg: float | None


def _seconds(values: list[int]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return round(statistics.fmean(values) / 1000, 3), round(statistics.median(values) / 1000, 3)


def _row(key: str, convs: list[Conversation]) -> ReportRow:
    waits = [c.first_assigned_at - c.created_at for c in convs if c.first_assigned_at]
    firsts = [c.first_response_at - c.created_at for c in convs if c.first_response_at]
    resolutions = [c.resolved_at - c.created_at for c in convs if c.resolved_at]
    abandoned = sum(
        1 for c in convs if c.state is ConversationState.CLOSED and c.first_assigned_at is None
    )
    scores = [c.csat_score for c in convs if c.csat_score is not None]
    wait_avg, wait_median = _seconds(waits)
    first_avg, first_median = _seconds(firsts)
    res_avg, res_median = _seconds(resolutions)
    return ReportRow(
        key=key,
        conversations=len(convs),
        assigned=len(waits),
        resolved=len(resolutions),
        abandoned=abandoned,
        abandonment_rate=round(abandoned / len(convs), 4) if convs else 0.0,
        wait_avg_s=wait_avg,
        wait_median_s=wait_median,
        first_response_avg_s=first_avg,
        first_response_median_s=first_median,
        resolution_avg_s=res_avg,
        resolution_median_s=res_median,
        csat_count=len(scores),
        csat_avg=round(statistics.fmean(scores), 3) if scores else None,
    )


def report(convs: Iterable[Conversation], by: str, default_group: str) -> list[ReportRow]:
    """One row per group (``by="group"``) or per agent (``by="agent"``), sorted by key."""
    buckets: dict[str, list[Conversation]] = {}
    for conv in convs:
        if by == "group":
            key: str | None = conv.group_id or default_group
        else:
            key = conv.agent_id or conv.previous_agent_id
        if key is not None:
            buckets.setdefault(key, []).append(conv)
    return [_row(key, buckets[key]) for key in sorted(buckets)]


def to_csv(rows: Iterable[ReportRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(["" if v is None else v for v in msgspec.structs.astuple(row)])
    return out.getvalue()
