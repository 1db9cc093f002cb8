"""fanout_straggler on hand-built traces: skewed and random stragglers, balanced fan-outs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors.fanout_straggler import detect
from hourglass.analysis.model import ShortenSpan
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
from tests.analysis._assertions import one_finding, run_detector
from tests.builders import TraceBuilder, spans_table
from tests.cli import analyze_file, otlp_json, otlp_span


def search_trace(
    branch_ms: list[float], *, shard_attr: bool = False, launch_gap_ms: float = 0.2
) -> TraceBuilder:
    """GET /search fans out one 'query shard' call per shard, launched together, then merges."""
    b = TraceBuilder(service="search-api")
    slowest = max(branch_ms)
    root = b.span("GET /search", start_ms=0, dur_ms=5 + slowest + 10, kind=KIND_SERVER)
    for i, dur in enumerate(branch_ms):
        b.span(
            "query shard",
            parent=root,
            start_ms=5 + i * launch_gap_ms,
            dur_ms=dur,
            kind=KIND_CLIENT,
            service="search-api",
            peer=None if shard_attr else f"shard-{i}.search.svc",
            hints={"search.shard_id": str(i)} if shard_attr else None,
        )
    b.span("merge results", parent=root, start_ms=5 + slowest + 1, dur_ms=8)
    return b


def analyse(builders: list[TraceBuilder]):
    return run_detector(detect, builders)


def test_same_shard_always_slow_is_skew_and_straggler_goes_to_the_median() -> None:
    traces = [search_trace([40, 42, 200 + 10 * i, 41]) for i in range(5)]
    f = one_finding(analyse(traces), "fanout_straggler", "parallelization", "search-api", "GET /search")
    assert f.targets == [{"service": "search-api", "operation": "query shard"}]
    assert f.evidence["pattern"] == "skew"
    assert f.evidence["slow_branch"] == "shard-2.search.svc"
    assert f.evidence["slow_branch_share"] == 1.0
    assert f.evidence["branch_identity"] == "peer"
    assert f.evidence["fanouts_with_straggler"] == 5
    assert len(f.occurrences) == 5 and len(f.trace_ids) == 5
    slowest_ms = {b.trace_id: 200 + 10 * i for i, b in enumerate(traces)}
    for occ in f.occurrences:
        # median of [40, 41, 42, 200+10i] is 41.5 ms: the straggler is cut by (200+10i) - 41.5 ms.
        assert len(occ.interventions) == 1
        (cut,) = occ.interventions
        assert isinstance(cut, ShortenSpan)
        assert cut.by_ns == pytest.approx((slowest_ms[occ.trace_id] - 41.5) * 1e6, abs=10)
        assert occ.numbers["median_ms"] == pytest.approx(41.5)
        assert occ.numbers["branches"] == 4
        assert len(occ.span_ids) == 5  # the parent, then the four branches
    assert f.evidence["max_over_median_p50"] == pytest.approx(220 / 41.5, rel=1e-3)
    assert f.confidence > 0.7


def test_random_slow_shard_is_tail() -> None:
    traces = []
    for i in range(6):
        branches = [30.0, 31.0, 32.0, 33.0]
        branches[i % 4] = 150.0
        traces.append(search_trace(branches, shard_attr=True))
    (f,) = analyse(traces)
    assert f.evidence["pattern"] == "tail"
    assert f.evidence["branch_identity"] == "shard"
    assert f.evidence["slow_branch_share"] <= 0.5


def test_shard_attribute_names_the_hot_shard() -> None:
    traces = [search_trace([20, 21, 22, 23, 120], shard_attr=True) for _ in range(4)]
    (f,) = analyse(traces)
    assert f.evidence["pattern"] == "skew"
    assert f.evidence["slow_branch"] == "4"
    assert f.evidence["branch_identity"] == "shard"


def test_balanced_fanout_gives_nothing() -> None:
    assert analyse([search_trace([40, 45, 52, 48, 60]) for _ in range(5)]) == []


def test_small_absolute_excess_is_noise() -> None:
    # 3× the median but only 4 ms more: below the 5 ms floor.
    assert analyse([search_trace([2, 2, 6]) for _ in range(5)]) == []


def test_two_branches_are_not_a_fanout() -> None:
    assert analyse([search_trace([20, 200]) for _ in range(5)]) == []


def test_staircase_fanout_is_not_a_straggler() -> None:
    # Four calls through a pool of two: the second wave starts when the first ends.
    b = TraceBuilder(service="api")
    root = b.span("GET /batch", start_ms=0, dur_ms=400, kind=KIND_SERVER)
    for i, (start, dur) in enumerate([(1, 50), (1, 52), (51, 48), (53, 300)]):
        b.span("fetch item", parent=root, start_ms=start, dur_ms=dur, kind=KIND_CLIENT, peer=f"item-{i}")
    assert analyse([b]) == []


def test_straggler_off_the_critical_path_is_ignored() -> None:
    # The fan-out is fire-and-forget work beside a longer sequential call: the slow branch does not
    # decide when the root ends.
    b = TraceBuilder(service="api")
    root = b.span("GET /page", start_ms=0, dur_ms=1000, kind=KIND_SERVER)
    fan = b.span("prefetch", parent=root, start_ms=1, dur_ms=120)
    for i, dur in enumerate([20, 21, 110]):
        b.span("warm cache", parent=fan, start_ms=2, dur_ms=dur, kind=KIND_CLIENT, peer=f"cache-{i}")
    b.span("render", parent=root, start_ms=0.5, dur_ms=990)
    assert analyse([b]) == []


def test_end_to_end_saving_is_the_straggler_cut_to_the_median() -> None:
    from hourglass.analysis.pipeline import analyze

    # Slowest branch 200 + 10i ms against a 41.5 ms median: the merge step waits for the straggler,
    # so each trace gets (200 + 10i) - 41.5 ms back: 158.5 ... 198.5 ms.
    report = analyze(spans_table([search_trace([40, 42, 200 + 10 * i, 41]) for i in range(5)]))
    (rec,) = [r for r in report["recommendations"] if r["kind"] == "fanout_straggler"]
    assert (rec["service"], rec["operation"]) == ("search-api", "GET /search")
    assert rec["traces_affected"] == 5
    impact = rec["impact"]
    assert impact["saved_ms_p50"] == pytest.approx(178.5, abs=0.01)
    assert impact["saved_ms_total"] == pytest.approx(5 * 158.5 + 100, abs=0.05)
    # Root durations are 215 + 10i ms.
    assert impact["share_of_root_latency"] == pytest.approx((5 * 158.5 + 100) / (5 * 215 + 100), abs=1e-3)
    assert rec["evidence"]["pattern"] == "skew"


def test_an_occasional_slow_branch_among_many_balanced_fanouts_is_noise() -> None:
    # 2 straggling fan-outs in 30 (under the 10 % rate): busy-host jitter, not a tail to hedge.
    traces = [search_trace([40, 42, 45, 41]) for _ in range(28)]
    traces += [search_trace([40, 42, 120, 41]) for _ in range(2)]
    assert analyse(traces) == []
    # The same two among ten fan-outs are a pattern.
    (f,) = analyse(traces[:8] + traces[-2:])
    assert f.evidence["straggler_rate"] == 0.2


def test_no_spans_and_a_lone_zero_length_span_give_nothing() -> None:
    from hourglass.collector.schema import empty_span_table

    assert detect(AnalysisContext.from_table(empty_span_table())) == []
    b = TraceBuilder(service="api")
    b.span("tick", start_ms=0, dur_ms=0)
    assert analyse([b]) == []


def test_the_answering_server_host_names_the_branch() -> None:
    # Same peer name for every branch (a load balancer); the server spans say which replica answered.
    traces = []
    for _ in range(4):
        b = TraceBuilder(service="api")
        root = b.span("GET /report", start_ms=0, dur_ms=130, kind=KIND_SERVER)
        for r, dur in enumerate([20, 22, 110, 23]):
            call = b.span(
                "fetch partition", parent=root, start_ms=1, dur_ms=dur, kind=KIND_CLIENT, peer="store.svc"
            )
            b.span(
                "fetch partition",
                parent=call,
                start_ms=1.5,
                dur_ms=dur - 1,
                kind=KIND_SERVER,
                service="store",
                host=f"store-{r}",
            )
        traces.append(b)
    (f,) = analyse(traces)
    assert f.evidence["branch_identity"] == "server_host"
    assert f.evidence["slow_branch"] == "store-2" and f.evidence["pattern"] == "skew"


def test_cli_reports_a_hot_shard_from_an_otlp_json_file(tmp_path: Path) -> None:
    spans = []
    for t in range(5):
        spans.append(otlp_span(t, 0, "GET /search", 2, 0, 95))
        for shard, dur in enumerate([20, 21, 22, 90]):
            url = f"http://index/shards/{shard}/search?q=x"
            spans.append(otlp_span(t, shard + 1, "GET", 3, 2, 2 + dur, url=url))
    path = tmp_path / "search.otlp.json"
    path.write_text(json.dumps(otlp_json({"search-api": spans})))
    report = analyze_file(path, timeout=120)
    (rec,) = [r for r in report["recommendations"] if r["kind"] == "fanout_straggler"]
    assert rec["targets"] == [{"service": "search-api", "operation": "GET /shards/{}/search"}]
    assert rec["evidence"]["pattern"] == "skew"
    assert rec["evidence"]["slow_branch"] == "http://index/shards/3/search"
    # Shard 3 (90 ms) cut to the 21.5 ms median; the fan-out then ends with the 22 ms shard, so the
    # root ends 92 - 24 = 68 ms earlier.
    assert rec["impact"]["saved_ms_p50"] == pytest.approx(68.0, abs=0.01)


def test_branches_that_start_together_are_labelled_the_same_whatever_the_rows_order() -> None:
    """Siblings launched at the same instant, with nothing that names them (no peer, shard or
    host), are labelled by their position among the siblings: ties in the start time are ranked by
    span id, so the same fan-out gets the same labels and the same slow branch in every run,
    whatever order the rows (and the joins before the ranking) leave them in."""
    import numpy as np

    traces = []
    for i in range(6):
        b = TraceBuilder(service="search-api")
        root = b.span("GET /search", start_ms=0, dur_ms=300, kind=KIND_SERVER)
        for j, dur in enumerate([40.0, 41.0, 42.0, 43.0]):
            # the same branch (by span id order) slow in every trace, all four launched at 5 ms
            slow = j == 1
            b.span(
                "query shard",
                parent=root,
                start_ms=5,
                dur_ms=250.0 + i if slow else dur,
                kind=KIND_CLIENT,
                service="search-api",
                span_id=f"{i:08x}{j:08x}",
            )
        traces.append(b)
    table = spans_table(traces)
    seen = set()
    for seed in range(8):
        order = np.random.default_rng(seed).permutation(table.num_rows)
        (f,) = detect(AnalysisContext.from_table(table.take(order)))
        seen.add((f.evidence["slow_branch"], f.evidence["slow_branch_share"], f.evidence["pattern"]))
    assert len(seen) == 1, seen
    ((slow_branch, share, pattern),) = seen
    assert share == 1.0 and pattern == "skew"
    assert slow_branch == "position 1", slow_branch
