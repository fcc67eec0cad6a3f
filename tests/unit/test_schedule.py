"""Business hours: validate and is_open with fixed, aware datetimes."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kefu.errors import ErrorCode, InvalidArgument
from kefu.schedule import DAYS, is_open, validate

UTC = dt.UTC
SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")

CANONICAL = {
    "timezone": "Asia/Shanghai",
    "hours": {"mon": [["09:00", "12:00"], ["13:00", "18:00"]], "sat": [["10:00", "16:00"]]},
}


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


# -- validate --------------------------------------------------------------------------------


def test_none_is_none() -> None:
    assert validate(None) is None


def test_canonical_input_is_returned_as_is() -> None:
    assert validate(CANONICAL) == CANONICAL
    assert validate(validate(CANONICAL)) == CANONICAL


def test_canonical_form() -> None:
    result = validate(
        {"timezone": "Europe/Berlin", "hours": {"tue": [("13:00", "24:00"), ["00:00", "09:30"]]}}
    )
    # tuples become lists, intervals are sorted
    assert result == {
        "timezone": "Europe/Berlin",
        "hours": {"tue": [["00:00", "09:30"], ["13:00", "24:00"]]},
    }


def test_defaults() -> None:
    assert validate({}) == {"timezone": "UTC", "hours": {}}
    assert validate({"timezone": "UTC"}) == {"timezone": "UTC", "hours": {}}
    assert validate({"hours": {"sun": []}}) == {"timezone": "UTC", "hours": {"sun": []}}


def test_every_day_key_accepted() -> None:
    hours = {day: [["00:00", "24:00"]] for day in DAYS}
    assert validate({"hours": hours}) == {"timezone": "UTC", "hours": hours}


def test_result_does_not_share_lists_with_input() -> None:
    given_hours = {"mon": [["09:00", "18:00"]]}
    result = validate({"hours": given_hours})
    assert result is not None
    result["hours"]["mon"][0][0] = "10:00"
    assert given_hours == {"mon": [["09:00", "18:00"]]}


def _rejected(schedule: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        validate(schedule)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    return info.value


@pytest.mark.parametrize(
    "zone",
    ["Not/AZone", "Mars/Olympus", "", "Europe", "utc", "UTC ", "/etc/localtime", "../etc", 42],
)
def test_rejects_bad_zone(zone: Any) -> None:
    _rejected({"timezone": zone, "hours": {}})


@pytest.mark.parametrize("day", ["monday", "Mon", "MON", "", "mo", "holiday", 0])
def test_rejects_bad_day_key(day: Any) -> None:
    _rejected({"timezone": "UTC", "hours": {day: [["09:00", "18:00"]]}})


@pytest.mark.parametrize(
    "interval",
    [
        ["25:00", "26:00"],
        ["09:00", "25:00"],
        ["9:00", "18:00"],
        ["09:00", "18:0"],
        ["09:00", "24:01"],
        ["12:60", "13:00"],
        ["09:00:00", "18:00"],
        ["0900", "1800"],
        ["", "18:00"],
        ["09:00", None],
        [900, 1800],
        ["-1:00", "18:00"],
        [" 09:00", "18:00"],
        ["10:00", "10:00"],  # empty
        ["18:00", "09:00"],  # backwards
        ["24:00", "24:00"],
        ["09:00"],
        ["09:00", "12:00", "18:00"],
        [],
        "09:00-18:00",
        {"start": "09:00", "end": "18:00"},
        None,
    ],
)
def test_rejects_bad_interval(interval: Any) -> None:
    error = _rejected({"timezone": "UTC", "hours": {"wed": [["08:00", "08:30"], interval]}})
    assert "wed" in error.message


@pytest.mark.parametrize("start", ["09:00\n", "0\u0669:00"])
def test_rejects_non_canonical_time_strings(start: str) -> None:
    _rejected({"timezone": "UTC", "hours": {"mon": [[start, "18:00"]]}})


@pytest.mark.parametrize(
    "intervals", [("09:00", "18:00"), "09:00-18:00", None, {"a": 1}, (["09:00", "18:00"],)]
)
def test_rejects_non_list_hours(intervals: Any) -> None:
    _rejected({"timezone": "UTC", "hours": {"mon": intervals}})


@pytest.mark.parametrize("hours", [None, [], "mon", [["09:00", "18:00"]], 1])
def test_rejects_hours_that_are_not_a_mapping(hours: Any) -> None:
    _rejected({"timezone": "UTC", "hours": hours})


@pytest.mark.parametrize(
    "schedule",
    [
        {"timezone": "UTC", "hours": {}, "extra": 1},
        {"tz": "UTC"},
        {"timezone": "UTC", "days": {}},
        [],
        "UTC",
        42,
    ],
)
def test_rejects_extra_keys_and_non_mappings(schedule: Any) -> None:
    _rejected(schedule)


# -- is_open ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "when", [utc(2024, 1, 15, 12), utc(2024, 6, 1, 3), dt.datetime(2000, 1, 1, tzinfo=SHANGHAI)]
)
def test_no_schedule_is_always_open(when: dt.datetime) -> None:
    assert is_open(None, when)


def test_empty_hours_are_always_closed() -> None:
    schedule = validate({"timezone": "UTC", "hours": {}})
    start = utc(2024, 1, 15)
    for hour in range(0, 24 * 7, 5):
        assert not is_open(schedule, start + dt.timedelta(hours=hour))


def test_time_zone_matters() -> None:
    # Monday 2024-01-15 02:00 UTC is Monday 10:00 in Shanghai (UTC+8, no DST)
    when = utc(2024, 1, 15, 2)
    hours = {"mon": [["09:00", "18:00"]]}
    assert is_open(validate({"timezone": "Asia/Shanghai", "hours": hours}), when)
    assert not is_open(validate({"timezone": "UTC", "hours": hours}), when)
    # the same instant expressed in another zone gives the same answer
    assert is_open(validate({"timezone": "Asia/Shanghai", "hours": hours}), when.astimezone(BERLIN))


def test_weekday_is_the_local_one() -> None:
    # Sunday 2024-01-14 20:00 UTC is Monday 04:00 in Shanghai
    when = utc(2024, 1, 14, 20)
    assert when.weekday() == 6
    assert is_open({"timezone": "Asia/Shanghai", "hours": {"mon": [["03:00", "05:00"]]}}, when)
    assert not is_open({"timezone": "Asia/Shanghai", "hours": {"sun": [["00:00", "24:00"]]}}, when)
    assert is_open({"timezone": "UTC", "hours": {"sun": [["19:00", "21:00"]]}}, when)
    assert not is_open({"timezone": "UTC", "hours": {"mon": [["00:00", "24:00"]]}}, when)


def test_missing_timezone_means_utc() -> None:
    assert is_open({"hours": {"mon": [["09:00", "10:00"]]}}, utc(2024, 1, 15, 9, 30))
    assert not is_open({"hours": {"mon": [["09:00", "10:00"]]}}, utc(2024, 1, 15, 10, 30))


SPLIT = {"timezone": "UTC", "hours": {"mon": [["09:00", "12:00"], ["13:00", "18:00"]]}}


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        (utc(2024, 1, 15, 8, 59, 59, 999999), False),
        (utc(2024, 1, 15, 9), True),  # start inclusive
        (utc(2024, 1, 15, 11, 59, 59), True),
        (utc(2024, 1, 15, 12), False),  # end exclusive
        (utc(2024, 1, 15, 12, 30), False),  # lunch
        (utc(2024, 1, 15, 13), True),
        (utc(2024, 1, 15, 17, 59, 59, 999999), True),
        (utc(2024, 1, 15, 18), False),
        (utc(2024, 1, 16, 10), False),  # Tuesday is not listed
        (utc(2024, 1, 22, 10), True),  # a week later
    ],
)
def test_interval_boundaries(when: dt.datetime, expected: bool) -> None:
    assert is_open(validate(SPLIT), when) is expected


def test_interval_ending_at_midnight() -> None:
    schedule = validate({"timezone": "UTC", "hours": {"fri": [["20:00", "24:00"]]}})
    assert not is_open(schedule, utc(2024, 1, 19, 19, 59))
    assert is_open(schedule, utc(2024, 1, 19, 20))
    assert is_open(schedule, utc(2024, 1, 19, 23, 59, 59, 999999))
    assert not is_open(schedule, utc(2024, 1, 20, 0))  # Saturday is not listed


def test_whole_day_and_midnight_start() -> None:
    schedule = validate({"timezone": "UTC", "hours": {"sat": [["00:00", "24:00"]]}})
    assert not is_open(schedule, utc(2024, 1, 19, 23, 59, 59))
    assert is_open(schedule, utc(2024, 1, 20, 0))
    assert is_open(schedule, utc(2024, 1, 20, 23, 59))
    assert not is_open(schedule, utc(2024, 1, 21, 0))


def test_only_listed_days_open() -> None:
    # 2024-01-15 is a Monday; days in DAYS order
    for listed in DAYS:
        schedule = validate({"timezone": "UTC", "hours": {listed: [["00:00", "24:00"]]}})
        for offset, day in enumerate(DAYS):
            assert is_open(schedule, utc(2024, 1, 15 + offset, 12)) is (day == listed)


def test_dst_spring_forward_in_berlin() -> None:
    # Clocks go from 02:00 CET (UTC+1) to 03:00 CEST (UTC+2) on Sunday 2024-03-31.
    schedule = validate(
        {"timezone": "Europe/Berlin", "hours": {day: [["09:00", "17:00"]] for day in DAYS}}
    )
    # Saturday before: 09:00 local is 08:00 UTC
    assert not is_open(schedule, utc(2024, 3, 30, 7, 59))
    assert is_open(schedule, utc(2024, 3, 30, 8))
    assert is_open(schedule, utc(2024, 3, 30, 15, 59))
    assert not is_open(schedule, utc(2024, 3, 30, 16))
    # Monday after: 09:00 local is 07:00 UTC, 17:00 local is 15:00 UTC
    assert not is_open(schedule, utc(2024, 4, 1, 6, 59))
    assert is_open(schedule, utc(2024, 4, 1, 7))
    assert is_open(schedule, utc(2024, 4, 1, 14, 59))
    assert not is_open(schedule, utc(2024, 4, 1, 15))


def test_dst_fall_back_in_berlin() -> None:
    # Clocks go from 03:00 CEST back to 02:00 CET on Sunday 2024-10-27.
    schedule = validate({"timezone": "Europe/Berlin", "hours": {"sun": [["02:00", "03:00"]]}})
    # 02:00-03:00 local happens twice: 00:00-01:00 UTC (CEST) and 01:00-02:00 UTC (CET)
    assert not is_open(schedule, utc(2024, 10, 26, 23, 59))
    assert is_open(schedule, utc(2024, 10, 27, 0, 30))
    assert is_open(schedule, utc(2024, 10, 27, 1, 30))
    assert not is_open(schedule, utc(2024, 10, 27, 2))
    monday = validate({"timezone": "Europe/Berlin", "hours": {"mon": [["09:00", "17:00"]]}})
    assert is_open(monday, utc(2024, 10, 28, 8))  # 09:00 CET
    assert not is_open(monday, utc(2024, 10, 28, 7, 59))


@given(
    start=st.integers(0, 24 * 60 - 1),
    length=st.integers(1, 24 * 60),
    minute=st.integers(0, 24 * 60 - 1),
    day=st.integers(0, 6),
)
def test_is_open_matches_minutes(start: int, length: int, minute: int, day: int) -> None:
    end = min(start + length, 24 * 60)

    def hhmm(m: int) -> str:
        return f"{m // 60:02d}:{m % 60:02d}"

    schedule = validate({"timezone": "Asia/Shanghai", "hours": {"wed": [[hhmm(start), hhmm(end)]]}})
    local = dt.datetime(2024, 1, 15 + day, minute // 60, minute % 60, 30, tzinfo=SHANGHAI)
    expected = DAYS[day] == "wed" and start <= minute < end
    assert is_open(schedule, local.astimezone(UTC)) is expected
