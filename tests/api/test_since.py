"""One `since` rule for the CLI (`--since`) and the REST API (`?since=`)."""

from __future__ import annotations

import pytest

from hourglass.api.settings import parse_since

NOW_NS = 1_800_000_000_000_000_000


def test_durations_count_back_from_now() -> None:
    assert parse_since("15m", NOW_NS) == NOW_NS - 15 * 60 * 10**9
    assert parse_since("2h", NOW_NS) == NOW_NS - 2 * 3600 * 10**9


def test_iso_times_without_a_timezone_are_utc() -> None:
    assert parse_since("2026-11-27T12:00:00", NOW_NS) == parse_since("2026-11-27T12:00:00Z", NOW_NS)
    assert parse_since("2026-11-27T13:00:00+01:00", NOW_NS) == parse_since("2026-11-27T12:00:00Z", NOW_NS)


@pytest.mark.parametrize("text", ["yesterday-ish", "1000000000000d"])
def test_errors_name_the_parameter_as_the_caller_spells_it(text: str) -> None:
    with pytest.raises(ValueError, match=r"^--since "):
        parse_since(text, NOW_NS, name="--since")
