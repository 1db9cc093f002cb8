"""The soak's verdicts (``bench.soak_serve``): with questions asked of serve, flatness is judged
between them and their transient peak against the memory budget."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from bench.soak_serve import Questions, question_bound_gib, summarize, verdicts

MIB = 2**20


def _rows(rss_at: dict[int, int], asking: set[int]) -> list[dict[str, Any]]:
    """A 10-minute soak's lines every 10 s: RSS (MiB) 800 unless ``rss_at`` says otherwise."""
    return [
        {
            "t": t,
            "rss": rss_at.get(t, 800) * MIB,
            "server": 500 * MIB,
            "workers": 300 * MIB,
            "lag": 10.0,
            "asking": t in asking,
        }
        for t in range(10, 610, 10)
    ]


def _verdict(lines: list[str], start: str) -> str:
    return next(line for line in lines if start in line)


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    load = SimpleNamespace(sent_spans=12_000_000, refused=0, errors=[])
    return summarize("incremental", rows, load, 600.0)  # type: ignore[arg-type]


def test_a_question_in_the_last_minute_alone_does_not_fail_flatness() -> None:
    # minute 2 has no question, the last minute has one that peaks at 1300 MiB and is given back
    summary = _summary(_rows({580: 1300, 120: 850}, asking={580}))
    lines = verdicts(summary)
    flat = _verdict(lines, "RSS flat")
    assert flat.startswith("PASS"), flat
    assert "between questions: 59 of 60 lines" in flat
    asked = _verdict(lines, "while questions are answered")
    assert asked.startswith("PASS") and "1.27 GiB in the second" in asked, asked
    assert _verdict(lines, "RSS <= 2 GiB").startswith("PASS")


def test_growth_between_questions_still_fails() -> None:
    # serve itself grows 40 % between the questions: not hidden by them
    rows = _rows({t: 800 + (t - 300) for t in range(300, 610, 10)}, asking={200, 400})
    flat = _verdict(verdicts(_summary(rows)), "RSS flat")
    assert flat.startswith("FAIL"), flat


def test_growth_while_questions_cover_the_end_of_the_run_is_not_a_pass() -> None:
    # questions in flight from 150 s on, RSS rising 800 -> 1,600 MiB under them: the last
    # minute has no line between questions, so flatness cannot be judged (the windows are the
    # run's minutes, not those of the lines left)
    rows = _rows(
        {t: 800 + (t - 150) * 16 // 10 for t in range(150, 610, 10)}, asking=set(range(150, 610, 10))
    )
    flat = _verdict(verdicts(_summary(rows)), "RSS flat")
    assert flat.startswith("FAIL") and "too few lines without a question" in flat, flat


def test_a_question_beyond_the_budget_fails_its_own_verdict() -> None:
    over = round(question_bound_gib() * 1024) + 50
    lines = verdicts(_summary(_rows({300: over}, asking={300})))
    assert _verdict(lines, "while questions are answered").startswith("FAIL")


def test_without_questions_every_line_is_judged_and_no_question_verdict() -> None:
    lines = verdicts(_summary(_rows({580: 1300}, asking=set())))
    assert _verdict(lines, "RSS flat").startswith("FAIL")
    assert not any("while questions" in line for line in lines)


def test_in_flight_covers_an_unanswered_question_and_a_short_tail() -> None:
    questions = Questions("http://127.0.0.1:9", every=3600)
    now = time.monotonic()
    questions.spans.append([now - 30, now - 20])  # answered 20 s ago
    assert questions.in_flight(now - 25, now - 15)
    assert not questions.in_flight(now - 15, now)
    questions.spans.append([now - 5, float("inf")])  # still asked
    assert questions.in_flight(now - 1, now)


def test_a_seeded_store_holds_the_spans_asked_in_ingest_order_before_now(tmp_path: Any) -> None:
    """``--stored``: the spans asked for (whole traces: about), a million an hour of ingest (here
    two hours of a few thousand), in ingest order, the newest a few minutes old, every span
    inside its ingest hour, so serve's retention keeps them and its rounds see them settled."""
    import duckdb

    from bench import analysis, soak_serve

    analysis.GENERATE_CHUNK_SPANS, saved = 3_000, analysis.GENERATE_CHUNK_SPANS
    try:
        stored = soak_serve.seed_store(tmp_path / "seed.duckdb", 6_000)
    finally:
        analysis.GENERATE_CHUNK_SPANS = saved
    assert 5_000 <= stored <= 7_000
    con = duckdb.connect(str(tmp_path / "seed.duckdb"), read_only=True)
    ingested = [r[0] for r in con.execute("SELECT ingested_ns FROM spans ORDER BY rowid").fetchall()]
    oldest, newest, ends = con.execute(
        "SELECT min(ingested_ns), max(ingested_ns), max(end_ns) FROM spans"
    ).fetchall()[0]
    con.close()
    now = time.time_ns()
    assert ingested == sorted(ingested)
    assert now - 3 * 3_600 * 10**9 < oldest and newest < now - 240 * 10**9 and ends < now
    assert newest - oldest > 3_600 * 10**9  # (two hours of ingest, a chunk an hour)


def test_spans_are_given_with_a_suffix_or_none() -> None:
    from bench.soak_serve import _spans

    assert _spans("20M") == 20_000_000 and _spans("500k") == 500_000 and _spans("1.5m") == 1_500_000
    assert _spans("1234") == 1234
