"""Business hours of a skill group: a weekly schedule in a time zone.

A schedule is JSON, as the REST API takes it::

    {"timezone": "Asia/Shanghai",
     "hours": {"mon": [["09:00", "12:00"], ["13:00", "18:00"]], "sat": [["10:00", "16:00"]]}}

Days missing from ``hours`` are closed; an interval may end at "24:00". No schedule (None)
means always open. Times are wall-clock times in the zone, so daylight-saving changes are
followed.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from collections.abc import Mapping
from typing import Any

from kefu.errors import InvalidArgument

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]|24:00")


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def validate(schedule: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The schedule in canonical form; raises InvalidArgument saying what is wrong."""
    if schedule is None:
        return None
    if not isinstance(schedule, Mapping) or set(schedule) - {"timezone", "hours"}:
        raise InvalidArgument("schedule takes 'timezone' and 'hours'")
    zone = schedule.get("timezone", "UTC")
    try:
        zoneinfo.ZoneInfo(str(zone))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidArgument(f"unknown time zone {zone!r}") from exc
    hours = schedule.get("hours", {})
    if not isinstance(hours, Mapping) or set(hours) - set(DAYS):
        raise InvalidArgument(f"schedule hours are keyed by {', '.join(DAYS)}")
    canonical: dict[str, list[list[str]]] = {}
    for day, intervals in hours.items():
        if not isinstance(intervals, list):
            raise InvalidArgument(f"hours of {day} must be a list of [start, end] pairs")
        out = []
        for interval in intervals:
            if (
                not isinstance(interval, list | tuple)
                or len(interval) != 2
                or not all(isinstance(t, str) and _TIME.fullmatch(t) for t in interval)
                or _minutes(interval[0]) >= _minutes(interval[1])
            ):
                raise InvalidArgument(f"bad interval {interval!r} on {day}: use ['09:00', '18:00']")
            out.append([interval[0], interval[1]])
        canonical[day] = sorted(out)
    return {"timezone": str(zone), "hours": canonical}


def is_open(schedule: Mapping[str, Any] | None, when: dt.datetime) -> bool:
    """Whether the schedule is open at ``when`` (an aware datetime)."""
    if schedule is None:
        return True
    local = when.astimezone(zoneinfo.ZoneInfo(str(schedule.get("timezone", "UTC"))))
    minute = local.hour * 60 + local.minute
    for start, end in schedule.get("hours", {}).get(DAYS[local.weekday()], ()):
        if _minutes(start) <= minute < _minutes(end):
            return True
    return False
