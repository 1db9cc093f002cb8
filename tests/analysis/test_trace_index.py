"""The trace index (``hourglass.analysis.trace_index``) answers by its definition for every trace,
packed in arrays (serve keeps it for as long as its report is served; it once held a dict of
tuples of span id strings per affected trace and grew with the store)."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hourglass.analysis.model import (
    CapConcurrency,
    CollapseSpans,
    Finding,
    Occurrence,
    RunConcurrently,
    ScaleSelf,
    ShortenSpan,
)
from hourglass.analysis.trace_index import TraceIndex


def _finding(operation: str, occurrences: list[Occurrence]) -> Finding:
    return Finding(
        kind="serialized_calls",
        category="parallelization",
        service="svc",
        operation=operation,
        targets=[{"service": "svc", "operation": operation}],
        occurrences=occurrences,
        confidence=1.0,
    )


def _case(seed: int) -> tuple[dict[str, Any], list[Finding], dict[str, list[str]]]:
    """A report of 4 recommendations over 300 traces (one finding not in the report), findings with
    several occurrences in one trace, interventions, exemplars and evidence span ids."""
    rng = random.Random(seed)
    traces = {
        f"{rng.getrandbits(128):032x}": [f"{rng.getrandbits(64):016x}" for _ in range(8)] for _ in range(300)
    }
    ids = sorted(traces)
    findings = []
    for n in range(5):
        occurrences = []
        for trace_id in rng.sample(ids, 120):
            spans = rng.sample(traces[trace_id], 3)
            interventions: tuple[Any, ...] = (
                (RunConcurrently(tuple(spans[:2])),) if n % 2 else (ShortenSpan(spans[2], 1_000),)
            )
            occurrences.append(Occurrence(trace_id, tuple(spans), interventions))
            if rng.random() < 0.2:  # a second occurrence of the same finding in the same trace
                occurrences.append(Occurrence(trace_id, (rng.choice(traces[trace_id]),)))
        findings.append(_finding(f"op{n}", occurrences))
    recs = []
    for rank, finding in enumerate(findings[:4], start=1):  # findings[4] is not reported
        exemplar = rng.choice(ids)
        recs.append(
            {
                "id": finding.id,
                "rank": rank,
                "evidence": {
                    "trace_ids": [exemplar],
                    "span_ids": [traces[exemplar][0], traces[rng.choice(ids)][1]],
                    "interventions": {exemplar: [{"type": "shorten_span", "span_id": traces[exemplar][5]}]},
                },
            }
        )
    return {"recommendations": recs}, findings, traces


def _stored(index: TraceIndex, folder: Path) -> TraceIndex:
    """``index`` as serve's server gets it: its arrays written to a file in ``folder``, the rest
    pickled, the file opened by the reader (its name removed at once) and read per lookup."""
    stored, path = index.stored(str(folder))
    assert os.path.dirname(path) == str(folder) and os.path.exists(path)
    copy: TraceIndex = pickle.loads(pickle.dumps(stored))
    assert len(pickle.dumps(stored)) < 10_000  # not the arrays: where they are
    copy.open_stored()
    assert not os.path.exists(path)
    assert not any(isinstance(v, np.ndarray) and v.size for v in vars(copy).values())
    return copy


def test_every_trace_answers_by_the_definition_also_after_pickling(tmp_path: Path) -> None:
    report, findings, traces = _case(11)
    index = TraceIndex.build(report, findings)
    copy = pickle.loads(pickle.dumps(index))  # how it travels from the analysis worker
    stored = _stored(index, tmp_path)  # how serve's server keeps it
    touched = 0
    for trace_id, spans in traces.items():
        expected = _definition(report, findings, trace_id, spans)
        touched += bool(expected)
        for candidate in (index, copy, stored):
            got = [
                (t.recommendation_id, t.span_ids, t.bottleneck_span_ids)
                for t in candidate.touching(trace_id, spans)
            ]
            assert got == expected, trace_id
    assert touched > 200  # most traces are touched; some are not (and answer nothing)
    # rules 1 and 2 name these traces: the reported findings' occurrences and the exemplars
    named = {o.trace_id for f in findings[:4] for o in f.occurrences}
    named |= {t for r in report["recommendations"] for t in r["evidence"]["trace_ids"]}
    assert index.traces() == copy.traces() == stored.traces() == len(named)
    assert copy == index == stored and TraceIndex.build(report, findings[:2]) != stored
    # a trace the index does not name is answered by its evidence spans alone
    stranger = report["recommendations"][1]["evidence"]["span_ids"]
    assert [t.recommendation_id for t in index.touching("f" * 32, stranger)] == [
        report["recommendations"][1]["id"]
    ]


def test_a_stored_index_stored_again_is_its_file_copied_and_answers_the_same(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """What serve keeps for a restart (``kept_report``): the served index, whose arrays are read
    from its open (unlinked) file, stored again: the file copied as it is, no array read into
    memory, every trace answered as before; with the kernel's copy unavailable, piece by piece."""
    from hourglass.analysis import trace_index

    report, findings, traces = _case(12)
    index = TraceIndex.build(report, findings)
    (tmp_path / "served").mkdir()
    served = _stored(index, tmp_path / "served")
    read: list[int] = []
    monkeypatch.setattr(trace_index._StoredArray, "__array__", lambda *a, **k: read.append(1))
    for copy_file_range in (True, False):
        if not copy_file_range:
            monkeypatch.delattr(os, "copy_file_range", raising=False)
            monkeypatch.setattr(trace_index, "_COPY_PIECE", 7)
        folder = tmp_path / f"kept-{copy_file_range}"
        folder.mkdir()
        kept, path = served.stored(str(folder))
        assert os.path.dirname(path) == str(folder) and not read
        copy: TraceIndex = pickle.loads(pickle.dumps(kept))
        copy.open_stored(consume=False)
        assert os.path.exists(path)  # (kept for the next start)
        for trace_id, spans in traces.items():
            assert copy.touching(trace_id, spans) == index.touching(trace_id, spans), trace_id
        assert copy.ranks == index.ranks and copy.evidence_spans == index.evidence_spans


def test_the_per_trace_part_is_arrays_not_objects_per_trace() -> None:
    report, findings, _ = _case(12)
    index = TraceIndex.build(report, findings)
    # the per-recommendation dicts are all the Python containers it keeps: nothing per trace
    containers = [v for v in vars(index).values() if isinstance(v, (dict, list, tuple, set))]
    assert sum(len(v) for v in containers) < 40
    arrays = [v for v in vars(index).values() if isinstance(v, np.ndarray)]
    assert len(arrays) == 7 and all(a.dtype != object for a in arrays)
    assert index.traces() > 250


def test_an_empty_index_and_a_report_alone(tmp_path: Path) -> None:
    assert TraceIndex().touching("a" * 32, ["b" * 16]) == []
    assert TraceIndex().traces() == 0
    assert _stored(TraceIndex(), tmp_path).touching("a" * 32, ["b" * 16]) == []
    assert _stored(TraceIndex(), tmp_path) == TraceIndex()
    report, _, traces = _case(13)
    alone = TraceIndex.from_report(report)
    for trace_id, spans in traces.items():
        expected = _definition(report, [], trace_id, spans)
        got = [
            (t.recommendation_id, t.span_ids, t.bottleneck_span_ids) for t in alone.touching(trace_id, spans)
        ]
        assert got == expected


def test_a_finding_computes_its_id_once_and_again_when_its_signature_changes() -> None:
    finding = _finding("op", [])
    first = finding.id
    assert finding.id is first and finding.signature == "serialized_calls|svc|op|svc/op|"
    finding.operation = "other"  # a field of the signature assigned: the id follows
    finding.targets = [{"service": "svc", "operation": "other"}]
    assert finding.id != first and finding.id == _finding("other", []).id
    finding.occurrences = [Occurrence("t", ("s",))]  # not part of the signature
    assert finding.id == _finding("other", []).id
    restored = pickle.loads(pickle.dumps(finding))
    assert restored.id == finding.id and restored == finding


def test_ids_beyond_ascii_answer_by_the_definition(tmp_path: Path) -> None:
    """Ids are packed as UTF-8 bytes in byte order (the lookup's), also when not plain ASCII."""
    traces = {"trace-é": ["span-ü", "span-a", "span-€"], "trace-a": ["s1", "s2"], "trace-😀": ["x", "y"]}
    findings = [
        _finding(
            "op",
            [
                Occurrence("trace-é", ("span-ü", "span-a"), (ShortenSpan("span-€", 5),)),
                Occurrence("trace-😀", ("y",), (RunConcurrently(("x", "y")),)),
                Occurrence("trace-a", ("s2",)),
            ],
        )
    ]
    report = {
        "recommendations": [
            {"id": findings[0].id, "rank": 1, "evidence": {"trace_ids": ["trace-é"], "span_ids": ["s1"]}}
        ]
    }
    for index in (
        TraceIndex.build(report, findings),
        pickle.loads(pickle.dumps(TraceIndex.build(report, findings))),
        _stored(TraceIndex.build(report, findings), tmp_path),
    ):
        assert index.traces() == 3
        for trace_id, spans in traces.items():
            got = [
                (t.recommendation_id, t.span_ids, t.bottleneck_span_ids)
                for t in index.touching(trace_id, spans)
            ]
            report["recommendations"][0]["evidence"].setdefault("interventions", {})
            assert got == _definition(report, findings, trace_id, spans), trace_id


def test_hex_ids_are_held_as_their_bytes_and_answer_as_text(tmp_path: Path) -> None:
    """OTLP's ids (lowercase hex) are packed as the bytes they spell, half the memory, ids ending
    or starting in zero bytes included; any other id keeps the whole set as text."""
    traces = {
        "00" * 15 + "a0": ["00000000000000ff", "ff00000000000000"],
        "ab" + "00" * 15: ["0000000000000000", "1234567890abcdef"],
        "0f" * 16: ["00000000000000f0"],
    }
    occurrences = [Occurrence(t, tuple(spans), (ShortenSpan(spans[0], 5),)) for t, spans in traces.items()]
    findings = [_finding("op", occurrences)]
    report = {
        "recommendations": [{"id": findings[0].id, "rank": 1, "evidence": {"trace_ids": [], "span_ids": []}}]
    }
    index = TraceIndex.build(report, findings)
    assert vars(index)["_trace_ids"].dtype.itemsize == 16 and vars(index)["_involved_ids"].dtype.itemsize == 8
    for candidate in (index, pickle.loads(pickle.dumps(index)), _stored(index, tmp_path)):
        for trace_id, spans in traces.items():
            [touch] = candidate.touching(trace_id, spans)
            assert touch.span_ids == tuple(sorted(spans)) and touch.bottleneck_span_ids == (spans[0],)
            assert candidate.touching(trace_id.upper(), spans) == []  # ids are matched exactly, as text
            assert candidate.touching(trace_id[:-2], spans) == []
            assert candidate.touching(trace_id + "00", spans) == []
    odd = [*occurrences, Occurrence("not-hex", ("s",))]
    mixed = TraceIndex.build(report, [_finding("op", odd)])
    assert (
        vars(mixed)["_trace_ids"].dtype.itemsize == 32 and vars(mixed)["_involved_ids"].dtype.itemsize == 16
    )
    assert [t.span_ids for t in mixed.touching("not-hex", ["s"])] == [("s",)]
    mixed_stored = _stored(mixed, tmp_path)
    for trace_id, spans in [*traces.items(), ("not-hex", ["s"]), ("not-he", ["s"]), ("not-hex\0", ["s"])]:
        assert mixed_stored.touching(trace_id, spans) == mixed.touching(trace_id, spans), trace_id
        assert mixed_stored.touching(trace_id + "x" * 40, spans) == []  # longer than any stored id
    assert mixed.touching("ab" + "00" * 15, traces["ab" + "00" * 15]) == index.touching(
        "ab" + "00" * 15, traces["ab" + "00" * 15]
    )


def _named(iv: Any) -> set[str]:
    """The spans an intervention of any kind names (None: none)."""
    if hasattr(iv, "span_ids"):
        return set(iv.span_ids)
    return set() if iv.span_id is None else {iv.span_id}


_BY_TRACE: list[tuple[list[Finding], dict[str, list[tuple[str, Any]]]]] = []


def _occurrences_by_trace(findings: list[Finding]) -> dict[str, list[tuple[str, Any]]]:
    """Every (finding id, occurrence) of ``findings`` by trace, in the findings' order: the
    definition's scan of every occurrence, done once per list of findings (done per trace it
    was most of this module's time)."""
    for known, grouped in _BY_TRACE:
        if known is findings:
            return grouped
    grouped = {}
    for finding in findings:
        for occ in finding.occurrences:
            grouped.setdefault(occ.trace_id, []).append((finding.id, occ))
    _BY_TRACE[:] = [(findings, grouped)]
    return grouped


def _definition(
    report: dict[str, Any], findings: list[Finding], trace_id: str, spans: list[str]
) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """The module's definition, computed plainly, for interventions of every kind (the report's
    recorded ones by span_id)."""
    present = set(spans)
    reported = {r["id"]: r for r in report["recommendations"]}
    involved: dict[str, set[str]] = {}
    changed: dict[str, set[str]] = {}
    for rec_id, rec in reported.items():
        evidence = rec["evidence"]
        if trace_id in evidence["trace_ids"] or present & set(evidence["span_ids"]):
            involved.setdefault(rec_id, set())
            changed.setdefault(rec_id, set())
        if trace_id in evidence["trace_ids"]:
            changed[rec_id].update(
                iv["span_id"] for iv in evidence.get("interventions", {}).get(trace_id, [])
            )
    for finding_id, occ in _occurrences_by_trace(findings).get(trace_id, []):
        if finding_id in reported:
            involved.setdefault(finding_id, set()).update(occ.span_ids)
            changed.setdefault(finding_id, set()).update(*(_named(iv) for iv in occ.interventions))
    out = []
    for rec_id in sorted(involved, key=lambda r: reported[r]["rank"]):
        evidence = set(reported[rec_id]["evidence"]["span_ids"]) & present
        changed_here = changed[rec_id] & present
        out.append(
            (
                rec_id,
                tuple(sorted((involved[rec_id] | changed[rec_id] | evidence) & present)),
                tuple(sorted(changed_here or evidence)),
            )
        )
    return out


def _shaped_case(
    seed: int, trace_id: Any, span_id: Any
) -> tuple[dict[str, Any], list[Finding], dict[str, list[str]]]:
    """300 traces of 8 spans, ids made by ``trace_id(i)`` / ``span_id(i)``; findings with every
    kind of intervention, mixed kinds in one finding, repeated spans and occurrences in one trace,
    occurrences without spans or interventions, a span named by no intervention (None)."""
    rng = random.Random(seed)
    traces = {trace_id(t): [span_id(t * 8 + s) for s in range(8)] for t in range(300)}
    ids = list(traces)
    findings = []
    for n in range(6):
        occurrences = []
        for trace in rng.sample(ids, 150):
            spans = rng.sample(traces[trace], 4)
            shapes: list[tuple[Any, ...]] = [
                (ShortenSpan(spans[0], 1),),
                (RunConcurrently(tuple(spans[:3])),),
                (CollapseSpans(tuple(spans[1:]), 5), CapConcurrency(tuple(spans[:2]), 2)),
                (ScaleSelf(spans[3], 0.5), ShortenSpan(spans[0], 3)),
                (ShortenSpan(None, 2),),  # type: ignore[arg-type]
                (),
            ]
            interventions = shapes[n] if n < 4 or rng.random() < 0.5 else rng.choice(shapes)
            occurrences.append(Occurrence(trace, tuple(spans) if n != 5 else (), interventions))
            if rng.random() < 0.3:  # the same finding again in this trace, a span repeated
                occurrences.append(Occurrence(trace, (spans[0], spans[0], rng.choice(traces[trace]))))
        findings.append(_finding(f"op{n}", occurrences))
    findings.append(_finding("empty", []))
    recs = []
    for rank, finding in enumerate([*findings[:5], findings[6]], start=1):  # findings[5]: not reported
        exemplar = rng.choice(ids)
        recs.append(
            {
                "id": finding.id,
                "rank": rank,
                "evidence": {
                    "trace_ids": [exemplar, rng.choice(ids)],
                    "span_ids": [traces[exemplar][0], traces[rng.choice(ids)][1]],
                    "interventions": {exemplar: [{"type": "shorten_span", "span_id": traces[exemplar][5]}]},
                },
            }
        )
    return {"recommendations": recs}, findings, traces


def test_ids_of_every_shape_and_interventions_of_every_kind_answer_by_the_definition(tmp_path: Path) -> None:
    """The packing takes OTLP's hex ids as the numbers they spell (sorted as such, ids close
    together or sharing their leading bytes included), and any other ids as text; both answer by
    the definition, with each array hex-packed exactly when all its ids are lowercase hex of one
    even length."""
    shapes = {
        "random hex": (
            lambda t: f"{random.Random(t).getrandbits(128):032x}",
            lambda s: f"{s * 2654435761:016x}",
        ),
        "sequential hex": (lambda t: f"{t:032x}", lambda s: f"{s:016x}"),
        "shared leading bytes": (
            lambda t: "ab" * 15 + f"{t % 256:02x}" if t < 256 else f"{t:032x}",
            lambda s: "cd" * 7 + f"{s % 256:02x}" if s < 256 else f"{s:016x}",
        ),
        "short hex": (lambda t: f"{t:06x}", lambda s: f"{s:012x}"),
        "long hex": (lambda t: f"{t:040x}", lambda s: f"{s:034x}"),
        "upper case": (lambda t: f"{t:032X}", lambda s: f"{s:016X}"),
        "odd length": (lambda t: f"{t:031x}", lambda s: f"{s:015x}"),
        "mixed lengths": (lambda t: f"{t:0{30 + 2 * (t % 2)}x}", lambda s: f"{s:0{14 + 2 * (s % 2)}x}"),
        "text": (lambda t: f"trace-{t}", lambda s: f"span-{s}"),
        "newlines": (lambda t: f"{t:015x}\n{t:016x}", lambda s: f"{s:07x}\n{s:08x}"),
        "empty span": (lambda t: f"{t:032x}", lambda s: "" if s % 8 == 7 else f"{s:016x}"),
    }
    for name, (trace_id, span_id) in shapes.items():
        report, findings, traces = _shaped_case(len(name), trace_id, span_id)
        index = TraceIndex.build(report, findings)
        for candidate in (index, pickle.loads(pickle.dumps(index)), _stored(index, tmp_path)):
            for trace, spans in traces.items():
                got = [
                    (t.recommendation_id, t.span_ids, t.bottleneck_span_ids)
                    for t in candidate.touching(trace, spans)
                ]
                assert got == _definition(report, findings, trace, spans), (name, trace)
        hexed = vars(index)["_hexed"]
        hex_traces = name not in ("upper case", "odd length", "mixed lengths", "text", "newlines")
        assert hexed == (
            hex_traces,
            hex_traces and name != "empty span",
            hex_traces and name != "empty span",
        ), name
    assert index.traces() > 250


def test_spans_packed_a_chunk_of_entries_at_a_time_give_the_same_index(monkeypatch: Any) -> None:
    """The spans of the entries are sorted and made unique a chunk of whole entries at a time
    (``_SPAN_CHUNK`` spans): chunks of any size, cut where an entry starts (entries of no span,
    spans repeated in an entry, an entry spread over several occurrences), give the index of one
    chunk, which answers by the definition."""
    from hourglass.analysis import trace_index

    for seed, (trace_id, span_id) in enumerate(
        [
            (lambda t: f"{random.Random(t).getrandbits(128):032x}", lambda s: f"{s * 2654435761:016x}"),
            (lambda t: f"{t:016x}", lambda s: f"{s:032x}"),  # two words per span id
            (lambda t: f"{t:032x}", lambda s: "" if s % 8 == 7 else f"{s:016x}"),  # text: not chunked
        ]
    ):
        report, findings, traces = _shaped_case(seed, trace_id, span_id)
        monkeypatch.setattr(trace_index, "_SPAN_CHUNK", 1 << 40)
        whole = TraceIndex.build(report, findings)
        for chunk in (1, 2, 7, 64, 1000):
            monkeypatch.setattr(trace_index, "_SPAN_CHUNK", chunk)
            index = TraceIndex.build(report, findings)
            assert index == whole, (seed, chunk)
            for name in ("_involved_ids", "_changed_ids"):  # the same dtype too, not only values
                assert vars(index)[name].dtype == vars(whole)[name].dtype
        for trace, spans in traces.items():
            got = [
                (t.recommendation_id, t.span_ids, t.bottleneck_span_ids) for t in index.touching(trace, spans)
            ]
            assert got == _definition(report, findings, trace, spans), (seed, trace)


def test_named_spans_read_from_the_findings_a_chunk_at_a_time_give_the_same_index(monkeypatch: Any) -> None:
    """The spans the findings' interventions name are read from each finding a chunk of rows at a
    time (``_RowWords``, no copy of every finding's at once) when they are words: the index is the
    one of every finding's named spans collected first, for chunks of any size."""
    from hourglass.analysis import trace_index

    read: list[int] = []
    reader = trace_index._changed_reader
    take_rows = trace_index._RowWords.take_rows
    monkeypatch.setattr(
        trace_index._RowWords, "take_rows", lambda self, *a: read.append(len(a[0])) or take_rows(self, *a)
    )
    for seed, (trace_id, span_id) in enumerate(
        [
            (lambda t: f"{random.Random(t).getrandbits(128):032x}", lambda s: f"{s * 2654435761:016x}"),
            (lambda t: f"{t:016x}", lambda s: f"{s:032x}"),  # two words per span id
        ]
    ):
        report, shaped, traces = _shaped_case(seed, trace_id, span_id)
        # (an intervention of no span id makes the named ids text: collected, not read by chunk)
        findings = [
            _finding(
                f.operation,
                [
                    o
                    for o in f.occurrences
                    if all(getattr(i, "span_id", "") is not None for i in o.interventions)
                ],
            )
            for f in shaped
        ]
        assert [f.id for f in findings] == [f.id for f in shaped]
        for chunk in (1, 7, 64, 1 << 40):
            monkeypatch.setattr(trace_index, "_SPAN_CHUNK", chunk)
            read.clear()
            monkeypatch.setattr(trace_index, "_changed_reader", reader)
            index = TraceIndex.build(report, findings)
            assert read, (seed, chunk)  # read a chunk at a time
            monkeypatch.setattr(trace_index, "_changed_reader", lambda *a: None)
            collected = TraceIndex.build(report, findings)
            assert index == collected, (seed, chunk)
            assert vars(index)["_changed_ids"].dtype == vars(collected)["_changed_ids"].dtype
            for trace, spans in traces.items():
                got = [
                    (t.recommendation_id, t.span_ids, t.bottleneck_span_ids)
                    for t in index.touching(trace, spans)
                ]
                assert got == _definition(report, findings, trace, spans), (seed, trace)


def test_an_index_built_into_a_file_a_chunk_at_a_time_is_the_one_stored_byte_for_byte(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """``build(folder=...)`` (serve's worker) writes the per-trace arrays to a file as each chunk
    of rows and of spans is made: the index is the one built in memory, its file byte for byte the
    one ``stored`` writes of it, for ids of every shape (text ones put whole), chunks of any
    size, a report alone and an empty one; it answers by the definition from the file."""
    from hourglass.analysis import trace_index

    cases = [
        _shaped_case(seed, trace_id, span_id)
        for seed, (trace_id, span_id) in enumerate(
            [
                (lambda t: f"{random.Random(t).getrandbits(128):032x}", lambda s: f"{s * 2654435761:016x}"),
                (lambda t: f"{t:016x}", lambda s: f"{s:032x}"),  # two words per span id
                (lambda t: f"{t:032x}", lambda s: "" if s % 8 == 7 else f"{s:016x}"),  # text span ids
                (lambda t: f"trace-{t}", lambda s: f"{s:016x}"),  # text trace ids
            ]
        )
    ]
    report, _, traces = _case(13)
    cases += [(report, [], traces), ({}, [], {})]
    for n, (report, findings, traces) in enumerate(cases):
        whole = TraceIndex.build(report, findings)
        for rows, spans in ((1 << 13, 1 << 18), (1, 1), (3, 7), (64, 1000)):
            monkeypatch.setattr(trace_index, "_ROW_CHUNK", rows)
            monkeypatch.setattr(trace_index, "_SPAN_CHUNK", spans)
            folder = tmp_path / f"{n}-{rows}"
            folder.mkdir()
            built = TraceIndex.build(report, findings, folder=str(folder), prefix="built-")
            path = built.stored_file()
            assert path is not None and os.path.dirname(path) == str(folder)
            assert TraceIndex.build(report, findings) == whole  # (in memory, these chunks too)
            _, again = whole.stored(str(folder), prefix="stored-")
            assert Path(path).read_bytes() == Path(again).read_bytes(), (n, rows)
            copy: TraceIndex = pickle.loads(pickle.dumps(built))
            copy.open_stored()
            assert os.listdir(folder) == [os.path.basename(again)]
            assert copy == whole, (n, rows)
            for trace, ids in list(traces.items())[:40]:
                got = [
                    (t.recommendation_id, t.span_ids, t.bottleneck_span_ids)
                    for t in copy.touching(trace, ids)
                ]
                assert got == _definition(report, findings, trace, ids), (n, trace)


def test_an_index_that_fails_being_built_into_a_file_leaves_none(tmp_path: Path, monkeypatch: Any) -> None:
    from hourglass.analysis import trace_index

    report, findings, _ = _case(11)
    calls: list[int] = []
    hex_bytes = trace_index._hex_bytes

    def fail_later(*args: Any) -> Any:
        calls.append(1)
        if len(calls) > 2:
            raise OSError("no space left")
        return hex_bytes(*args)

    monkeypatch.setattr(trace_index, "_ROW_CHUNK", 5)
    monkeypatch.setattr(trace_index, "_hex_bytes", fail_later)
    with pytest.raises(OSError, match="no space left"):
        TraceIndex.build(report, findings, folder=str(tmp_path))
    assert len(calls) > 2 and os.listdir(tmp_path) == []


def _named_only(findings: list[Finding]) -> list[Finding]:
    """``findings`` without the occurrences of an intervention that names no span (None)."""
    return [
        _finding(
            f.operation,
            [o for o in f.occurrences if all(getattr(i, "span_id", "") is not None for i in o.interventions)],
        )
        for f in findings
    ]


def test_an_index_built_a_range_of_trace_ids_at_a_time_is_the_one_of_every_row_at_once(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """With more rows than ``_BUCKET_ROWS`` the rows of each range of trace ids (a bucket) are read
    from each finding and packed before the next range's: buckets of any size (a row, a few, one
    range of ids that share their first word) give the index of every row at once, in memory and
    in its file byte for byte, no other file left; ids that are not all words (text ids, an
    intervention naming no span) are packed at once, as before."""
    from hourglass.analysis import trace_index

    packs: list[int] = []
    pack = TraceIndex._pack
    monkeypatch.setattr(TraceIndex, "_pack", lambda self, *a, **k: packs.append(1) or pack(self, *a, **k))
    shapes = {
        "random hex": (
            lambda t: f"{random.Random(t).getrandbits(128):032x}",
            lambda s: f"{s * 2654435761:016x}",
        ),
        "two-word span ids": (lambda t: f"{t:016x}", lambda s: f"{s:032x}"),
        "one first word": (lambda t: "ab" * 8 + f"{t:016x}", lambda s: f"{s:016x}"),
        "text span ids": (lambda t: f"{t:032x}", lambda s: "" if s % 8 == 7 else f"{s:016x}"),
        "text trace ids": (lambda t: f"trace-{t}", lambda s: f"{s:016x}"),
    }
    for name, (trace_id, span_id) in shapes.items():
        report, shaped, traces = _shaped_case(len(name), trace_id, span_id)
        for variant, (findings, words) in enumerate(
            ((_named_only(shaped), "text" not in name), (shaped, False))
        ):
            monkeypatch.setattr(trace_index, "_BUCKET_ROWS", 1 << 40)
            whole = TraceIndex.build(report, findings)
            for rows in (1, 7, 160):
                monkeypatch.setattr(trace_index, "_BUCKET_ROWS", rows)
                packs.clear()
                index = TraceIndex.build(report, findings)
                assert index == whole, (name, words, rows)
                for array in ("_trace_ids", "_involved_ids", "_changed_ids"):
                    assert vars(index)[array].dtype == vars(whole)[array].dtype, (name, rows, array)
                if words:  # (ids that share their first word are in one bucket)
                    assert len(packs) > 1 or name == "one first word", (name, rows)
                folder = tmp_path / f"{name}-{variant}-{rows}"
                folder.mkdir()
                built = TraceIndex.build(report, findings, folder=str(folder), prefix="built-")
                path = built.stored_file()
                assert path is not None
                _, again = whole.stored(str(folder), prefix="stored-")
                assert Path(path).read_bytes() == Path(again).read_bytes(), (name, words, rows)
                assert sorted(os.listdir(folder)) == sorted(os.path.basename(p) for p in (path, again))
                copy: TraceIndex = pickle.loads(pickle.dumps(built))
                copy.open_stored()
                assert copy == whole
                for trace, ids in list(traces.items())[:60]:
                    got = [
                        (t.recommendation_id, t.span_ids, t.bottleneck_span_ids)
                        for t in copy.touching(trace, ids)
                    ]
                    assert got == _definition(report, findings, trace, ids), (name, trace)


def test_parked_findings_are_read_one_at_a_time_a_range_of_trace_ids_at_a_time(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Serve's round builds the index of parked findings (their columns in files): with more rows
    than ``_BUCKET_ROWS`` it reads one finding's columns at a time, for one range of trace ids,
    and lets them go before the next finding's, so that no two findings' columns are ever held
    at once, none while a range is packed, none after."""
    from hourglass.analysis import trace_index

    report, shaped, _ = _shaped_case(
        3, lambda t: f"{random.Random(t).getrandbits(128):032x}", lambda s: f"{s * 2654435761:016x}"
    )
    findings = _named_only(shaped)
    whole = TraceIndex.build(report, findings)
    for finding in findings:
        finding.occurrence_table.park(str(tmp_path))
    assert sum(f.occurrence_table.is_parked() for f in findings) == len(findings) - 1  # (not the empty one)

    def holding(but: Any = None) -> int:
        """How many parked findings (not ``but``) hold columns read back (an empty one is not parked)."""
        tables = [f.occurrence_table for f in findings if f.occurrence_table is not but]
        return sum(bool(table.held()) for table in tables if table.is_parked())

    held_reading: list[int] = []
    held_packing: list[int] = []
    bucket_rows = trace_index._bucket_rows
    pack = TraceIndex._pack
    monkeypatch.setattr(
        trace_index, "_bucket_rows", lambda own, *a: held_reading.append(holding(own)) or bucket_rows(own, *a)
    )
    monkeypatch.setattr(
        TraceIndex, "_pack", lambda self, *a, **k: held_packing.append(holding()) or pack(self, *a, **k)
    )
    monkeypatch.setattr(trace_index, "_BUCKET_ROWS", 60)
    released: list[int] = []  # (serve's worker returns the freed heap after each range)
    index = TraceIndex.build(report, findings, release=lambda: released.append(len(held_packing)))
    assert index == whole
    assert len(held_packing) > 5 and len(held_reading) > 5 * len(findings) - 5
    assert released == list(range(1, len(held_packing) + 1))
    assert not any(held_reading) and not any(held_packing) and not holding()


def test_an_index_that_fails_being_built_a_range_at_a_time_leaves_no_file(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """An error in any bucket, or while the arrays are put together in the index's file, removes
    every file the build wrote (the arrays' parts, the index's)."""
    from hourglass.analysis import trace_index

    report, findings, _ = _case(11)
    monkeypatch.setattr(trace_index, "_BUCKET_ROWS", 40)
    hex_bytes, copy = trace_index._hex_bytes, trace_index._copy
    for where, after in (("_hex_bytes", 0), ("_hex_bytes", 9), ("_copy", 3)):
        calls: list[int] = []

        def fail_later(*args: Any, where: str = where, after: int = after, calls: list[int] = calls) -> Any:
            calls.append(1)
            if len(calls) > after:
                raise OSError("no space left")
            return (hex_bytes if where == "_hex_bytes" else copy)(*args)

        monkeypatch.setattr(trace_index, where, fail_later)
        folder = tmp_path / f"{where}-{after}"
        folder.mkdir()
        with pytest.raises(OSError, match="no space left"):
            TraceIndex.build(report, findings, folder=str(folder))
        assert len(calls) > after and os.listdir(folder) == [], (where, after)
        monkeypatch.setattr(trace_index, where, hex_bytes if where == "_hex_bytes" else copy)
