"""Soak benchmark: a real `hourglass serve` as the OTLP target of a staging environment.

    python -m bench.soak_serve [--rate 20000] [--duration 10m] [--quick] [--no-baseline]

Sends realistic traces (``bench.analysis.generate_spans``: every mixed shape of the analysis
benchmark, whole traces per request, pre-serialised OTLP ``ExportTraceServiceRequest``s whose
trace ids and timestamps are rewritten per send: every trace ends a minute before it is sent, so
time moves forward as in a real staging environment — replaying one fixed set of timestamps would
pile every send onto the same instants, millions of spans concurrent on one resource) at a sustained rate over OTLP/gRPC to a real ``serve``
subprocess on a fresh DuckDB file, and prints every 10 s:

* ``rss``: the highest RSS of serve and all its child processes (the analysis worker), summed,
  since the last line (sampled every 0.5 s), then the server process's and its children's apart
  at that moment (``server``, ``workers``);
* ``stored``: spans in the store (``GET /v1/stats``);
* ``settled``: traces extracted by the incremental analysis (``-`` for the full re-analysis,
  which has no such notion) and ``in report``: the report's ``traces_analyzed``;
* ``lag``: how long the oldest settled trace not in the report has waited: now minus the start
  of the analysis run behind the current report (a trace that settled before that start is in
  it; exact while spans keep arriving), or, when that round left settled traces for later (a
  backlog: a round extracts at most ``MAX_ROUND_SPANS`` new spans), since the oldest of those settled;
* ``refused``: Exports answered RESOURCE_EXHAUSTED/UNAVAILABLE since the start;
* the server process's memory by part (``/v1/stats`` ``server_memory``, MiB): ``anon``
  (anonymous, i.e. without the shared libraries), glibc's ``heap`` in use and the ``free`` memory it
  holds, DuckDB's buffer pool in use (``duckdb``) and what DuckDB's own allocator keeps resident
  (``ddb_res``), Arrow's pool (``arrow``), Python's allocated blocks (``py_kblk``, thousands),
  and the resident pages of mapped files (``file``: the shared libraries' code, faulted in as code
  paths first run) and of shared memory (``shmem``), from ``/proc/PID/status`` (RSS is ``anon``
  + ``file`` + ``shmem``);

and, as each round ends, its time and where it went: the server's stages (``store_stats``, ``scan``:
the reads it answered for the worker, ``analysis``, ``snapshot``, ``release``, ``html``), the
worker's round phases in brackets, and the reads by kind (count and seconds). The phase's end
prints what grew from the early to the late window: each server part's highest, and the longest
round with its phases.

The same run is then repeated with ``HOURGLASS_INCREMENTAL_ANALYSIS=false`` and
``HOURGLASS_SERVE_PARTITIONS=1`` (the whole-store
re-analysis of before, the baseline) unless ``--no-baseline``. Targets (issue 11): RSS flat and
≤ 2 GiB, every settled trace in the report within 60 s, ingest never refused because analysis is
busy.

Each phase ends with one verdict line per target: peak RSS ≤ 2 GiB; RSS flat (the highest RSS of
the last minute within 10 % of the highest of minute 2 — rounds make RSS saw-toothed, so maxima
of windows are compared — with the least-squares slope from minute 2 on; a run of less than four
minutes compares its halves); max lag ≤ 60 s; nothing refused. With ``--questions N``, every N
seconds a question is asked of the running serve in turn (a what-if of its first recommendation
over the whole store, the critical path of its busiest endpoint), each printed with its status and
seconds, and a line per kind says how many were answered. A question's working set is transient:
it plans for the memory budget less what serve holds (``planning.question_room``) and gives it
back before it answers. So the flat verdict is then judged on the lines during which no question
was in flight (whether minute 2 or the last minute holds one is an accident of timing: with one,
the maxima compared a question's peak with a window without any), and the peak while questions are
answered gets a verdict of its own: within the memory budget plus a fresh process' base, first
half of the run and second half printed beside it. The RSS ≤ 2 GiB verdict counts every line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

from bench._process import start_serve
from bench.ingest import _kv as kv_attribute

ROOT = Path(__file__).resolve().parents[1]
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
PLACEHOLDER = b"HGSOAKPH"  # first 8 bytes of every trace id in a template, rewritten per send
REQUEST_SPANS = 1_000  # about: whole traces per request
TEMPLATE_SPANS = 40_000
GIB = 2**30
ATTRIBUTES = {
    "db_system": "db.system",
    "db_statement": "db.statement",
    "http_method": "http.request.method",
    "http_route": "http.route",
    "http_url": "url.full",
    "http_status_code": "http.response.status_code",
    "rpc_method": "rpc.method",
    "peer": "peer.service",
    "messaging_destination": "messaging.destination.name",
}


def _kv(key: str, value: Any) -> common_pb2.KeyValue:
    """``bench.ingest``'s attribute builder; any other value as its text."""
    return kv_attribute(key, value if isinstance(value, (str, int, float, bool)) else str(value))


@dataclass(frozen=True)
class Template:
    """One pre-serialised request: ``data`` with trace ids PLACEHOLDER + the trace's number in the
    request, its traces ending a minute before ``built_ns``; ``times``: the byte offsets of every
    span's start and end (fixed64, little-endian) in ``data``, shifted per send."""

    data: bytes
    spans: int
    traces: int
    times: np.ndarray
    built_ns: int

    def at(self, prefix: bytes, now_ns: int) -> bytes:
        """The request as sent at ``now_ns``: trace ids prefixed, every time moved by the time
        since the template was built (so its traces end a minute before ``now_ns``)."""
        buf = np.frombuffer(bytearray(self.data.replace(PLACEHOLDER, prefix)), dtype=np.uint8)
        where = self.times[:, None] + np.arange(8)
        moved = buf[where].copy().view("<u8") + np.uint64(now_ns - self.built_ns)
        buf[where] = moved.view(np.uint8).reshape(-1, 8)
        return buf.tobytes()


def _time_offsets(data: bytes, values: set[tuple[int, int]]) -> np.ndarray:
    """The offsets of the fixed64 values of span fields (field, value) in ``data``: every
    occurrence of the field's tag followed by the value's 8 bytes (a field's tag and 8 bytes of
    one of the exact times set, elsewhere in a request: never in practice)."""
    found: set[int] = set()
    for number, value in values:
        needle = bytes([(number << 3) | 1]) + struct.pack("<Q", value)
        at = data.find(needle)
        while at >= 0:
            found.add(at + 1)
            at = data.find(needle, at + 1)
    return np.array(sorted(found), dtype=np.int64)


def build_templates(spans: int = TEMPLATE_SPANS) -> list[Template]:
    """Requests of about REQUEST_SPANS spans of whole mixed-shape traces each (:class:`Template`)."""
    from bench.analysis import generate_spans

    table = generate_spans(spans, seed=11)
    rows = table.drop_columns(["raw", "resource_json"]).to_pylist()
    traces: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        traces.setdefault(row["trace_id"], []).append(row)
    built = time.time_ns()
    now = built - 60 * 10**9
    out: list[Template] = []
    pending: list[list[dict[str, Any]]] = []
    count = 0
    for spans_of_trace in traces.values():
        pending.append(spans_of_trace)
        count += len(spans_of_trace)
        if count >= REQUEST_SPANS:
            out.append(_template(pending, now, built))
            pending, count = [], 0
    if pending:
        out.append(_template(pending, now, built))
    return out


def _template(traces: list[list[dict[str, Any]]], now: int, built: int) -> Template:
    data = _request(traces, now)
    values: set[tuple[int, int]] = set()
    for spans in traces:
        shift = now - max(s["end_ns"] for s in spans)
        for s in spans:
            values.add((7, s["start_ns"] + shift))  # Span.start_time_unix_nano
            values.add((8, s["end_ns"] + shift))  # Span.end_time_unix_nano
    times = _time_offsets(data, values)
    count = sum(len(t) for t in traces)
    if len(times) != 2 * count:  # every span its start and its end, nothing else
        raise RuntimeError(f"soak template: found {len(times)} span times for {count} spans")
    return Template(data, count, len(traces), times, built)


def _request(traces: list[list[dict[str, Any]]], now: int) -> bytes:
    request = trace_service_pb2.ExportTraceServiceRequest()
    by_service: dict[tuple[str, str | None], Any] = {}
    for number, spans in enumerate(traces):
        trace_id = PLACEHOLDER + struct.pack(">Q", number + 1)
        shift = now - max(s["end_ns"] for s in spans)
        for s in spans:
            key = (s["service"], s["host"])
            scope = by_service.get(key)
            if scope is None:
                resource = request.resource_spans.add()
                resource.resource.attributes.extend(
                    [_kv("service.name", s["service"]), _kv("telemetry.sdk.language", "python")]
                    + ([_kv("host.name", s["host"])] if s["host"] else [])
                )
                scope = by_service[key] = resource.scope_spans.add()
                scope.scope.name = s["scope_name"] or "bench"
            span = scope.spans.add()
            span.trace_id = trace_id
            span.span_id = bytes.fromhex(s["span_id"])
            if s["parent_span_id"]:
                span.parent_span_id = bytes.fromhex(s["parent_span_id"])
            span.name = s["name"]
            span.kind = int(s["kind"])
            span.start_time_unix_nano = s["start_ns"] + shift
            span.end_time_unix_nano = s["end_ns"] + shift
            span.status.code = int(s["status_code"])
            if s["status_message"]:
                span.status.message = s["status_message"]
            for column, key_name in ATTRIBUTES.items():
                if s.get(column) is not None:
                    span.attributes.append(_kv(key_name, s[column]))
            if s["hints"]:
                for k, v in json.loads(s["hints"]).items():
                    span.attributes.append(_kv(k, v))
    return request.SerializeToString()


@dataclass
class Load:
    """Paced senders: ``rate`` spans/s of the templates, trace ids unique per send."""

    target: str
    rate: float
    templates: list[Template]
    threads: int = 4
    sent_spans: int = 0
    sent_traces: int = 0
    refused: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self._started = time.monotonic()
        self._workers = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)
        ]
        for w in self._workers:
            w.start()

    def _run(self, thread_id: int) -> None:
        channel = grpc.insecure_channel(self.target, options=[("grpc.max_send_message_length", 64 << 20)])
        call = channel.unary_unary(EXPORT_METHOD)
        counter = 0
        per_thread = self.rate / self.threads
        done = 0
        while not self._stop.is_set():
            template = self.templates[(counter * self.threads + thread_id) % len(self.templates)]
            spans, traces = template.spans, template.traces
            counter += 1
            due = self._started + done / per_thread  # pacing: spans sent so far at the rate
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            prefix = struct.pack(">HHI", 0x5A5A, thread_id, counter)  # unique in the run
            try:
                call(template.at(prefix, time.time_ns()), timeout=30)
                done += spans
                with self._lock:
                    self.sent_spans += spans
                    self.sent_traces += traces
            except grpc.RpcError as err:
                if err.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                    with self._lock:
                        self.refused += 1
                    self._stop.wait(0.5)
                else:
                    self.errors.append(f"{err.code()}: {err.details()}")
                    return
        channel.close()

    def stop(self) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(35)


def _rss(pid: int) -> tuple[int, int]:
    """RSS of the process ``pid`` and of all its children (summed)."""
    try:
        process = psutil.Process(pid)
        own = process.memory_info().rss
        children = 0
        for child in process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                children += child.memory_info().rss
        return own, children
    except psutil.Error:
        return 0, 0


class RssSampler:
    """RSS of a process and its children every ``every`` seconds in a thread; :meth:`take` gives
    the highest (sum, own, children) since the last take: a round's peak falls between the
    report lines."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        self.pid, self.every = pid, every
        self._high = (0, 0, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            own, children = _rss(self.pid)
            with self._lock:
                if own + children > self._high[0]:
                    self._high = (own + children, own, children)

    def take(self) -> tuple[int, int, int]:
        own, children = _rss(self.pid)
        with self._lock:
            high = max(self._high, (own + children, own, children))
            self._high = (0, 0, 0)
        return high

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# the server process's memory by part (GET /v1/stats server_memory, hourglass.api.server_memory):
# anonymous memory, glibc's C heap in use and freed-but-held, DuckDB's buffer pool and what its
# own allocator (jemalloc) keeps resident, Arrow's pool
MEMORY_COLUMNS = (
    ("anon", 5),
    ("heap", 5),
    ("free", 5),
    ("duckdb", 6),
    ("ddb_res", 7),
    ("arrow", 5),
    ("py_kblk", 7),
    ("file", 5),
    ("shmem", 5),
)


def server_parts(memory: dict[str, Any] | None) -> dict[str, int | None]:
    """The columns of :data:`MEMORY_COLUMNS` from ``server_memory`` (None: not reported)."""
    memory = memory or {}
    glibc = memory.get("glibc") or {}
    return {
        "anon": memory.get("anon"),
        "heap": glibc.get("in_use"),
        "free": glibc.get("free"),
        "duckdb": (memory.get("duckdb") or {}).get("used"),
        "ddb_res": (memory.get("duckdb_allocator") or {}).get("resident"),
        # thousands of Python allocator blocks (a count, not MiB: objects kept alive)
        "py_kblk": None if memory.get("python_blocks") is None else memory["python_blocks"] * 2**20 // 1000,
        "arrow": (memory.get("arrow") or {}).get("allocated"),
    }


def resident_files(pid: int) -> dict[str, int | None]:
    """The process ``pid``'s resident pages that are not anonymous, in bytes (Linux's
    ``/proc/PID/status``; None elsewhere): ``file``, pages of mapped files (the shared libraries'
    code and data: polars', DuckDB's and Arrow's are ~330 MiB on disk, and a page is resident
    once a code path has run; clean, so the kernel can drop them under pressure), ``shmem``,
    mapped shared memory. RSS is ``anon`` + ``file`` + ``shmem``: what of RSS's growth is not
    ``anon`` is in one of these. (Not ``/v1/stats``' ``file`` and ``shmem``: those are the
    server's proportional shares, ``smaps_rollup``'s Pss, which fall as its workers map the same
    libraries; RSS counts each page whole.)"""
    out: dict[str, int | None] = {"file": None, "shmem": None}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("RssFile", "RssShmem"):
                    out["file" if key == "RssFile" else "shmem"] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _mib(value: int | None, width: int) -> str:
    return f"{'-' if value is None else format(value / 2**20, '.0f'):>{width}}"


def round_phases(analysis: dict[str, Any], t: int, stored: int | None) -> dict[str, Any]:
    """The last run's time and where it went (``/v1/stats``: ``last_stages_ms`` in the server,
    the incremental round's own phases in the worker), as a row and one line of text."""
    stages = {k: v / 1000 for k, v in (analysis.get("last_stages_ms") or {}).items()}
    figures = analysis.get("incremental_round") or {}
    phases = {k: float(v) for k, v in (figures.get("seconds") or {}).items()}
    total = (analysis.get("last_duration_ms") or 0) / 1000
    parts = []
    for name, seconds in stages.items():
        if name == "analysis" and phases:
            inner = ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
            parts.append(f"analysis {seconds:.1f} ({inner})")
        elif seconds >= 0.05:
            parts.append(f"{name} {seconds:.1f}")
    reads = analysis.get("last_reads_ms") or {}
    kinds = [k for k in reads if not k.endswith("_count")]
    if kinds:  # the worker's reads answered by the server (the "scan" stage), by kind
        parts.append(
            "reads " + ", ".join(f"{k} {reads.get(k + '_count', 0)}x {reads[k] / 1000:.1f}" for k in kinds)
        )
    text = f"{total:.1f} s at {stored or 0:,} stored: " + ", ".join(parts)
    if figures:
        text += (
            f"; {figures.get('settled_new_traces', 0):,} new traces, "
            f"{figures.get('partitions_read', 0)} batches read"
        )
    return {"t": t, "stored": stored, "seconds": total, "stages": stages, "phases": phases, "text": text}


class Questions:
    """Every ``every`` seconds, a question a user asks of the running serve, in turn: a what-if of
    the report's first recommendation over the whole store, then the critical path of the report's
    busiest endpoint; each answer's status and seconds are kept (what a staging target is used for
    beside its reports, and what its memory must hold beside the ingest)."""

    def __init__(self, api: str, every: float) -> None:
        self.api = api
        self.every = every
        self.asked: list[dict[str, Any]] = []  # t, kind, status, seconds, detail
        # [asked, answered] monotonic times of every question; answered inf while in flight
        self.spans: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-questions", daemon=True)
        self._started = time.monotonic()

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=600)

    def _run(self) -> None:
        turn = 0
        while not self._stop.wait(self.every):
            try:
                report = _get(f"{self.api}/v1/recommendations")
            except OSError:
                continue
            recs, paths = report.get("recommendations") or [], report.get("critical_paths") or []
            if turn % 2 == 0 and recs:
                kind, request = (
                    "what-if",
                    urllib.request.Request(
                        f"{self.api}/v1/whatif",
                        data=json.dumps({"changes": [{"recommendation": recs[0]["id"]}]}).encode(),
                        headers={"content-type": "application/json"},
                    ),
                )
            elif paths:
                query = urllib.parse.urlencode(
                    {"service": paths[0]["service"], "operation": paths[0]["operation"]}
                )
                kind, request = (
                    "critical-path",
                    urllib.request.Request(f"{self.api}/v1/critical-path?{query}"),
                )
            else:
                continue
            turn += 1
            asked = time.monotonic()
            span = [asked, math.inf]
            self.spans.append(span)
            try:
                with urllib.request.urlopen(request, timeout=900) as answer:
                    status, detail = answer.status, ""
                    answer.read()
            except urllib.error.HTTPError as exc:
                status, detail = exc.code, exc.read()[:200].decode(errors="replace")
            except OSError as exc:
                status, detail = 0, str(exc)[:200]
            took = time.monotonic() - asked
            span[1] = asked + took
            self.asked.append(
                {
                    "t": round(asked - self._started),
                    "kind": kind,
                    "status": status,
                    "seconds": took,
                    "detail": detail,
                }
            )
            print(
                f"{'':>6}{kind} at {round(asked - self._started)} s: {status} in {took:.1f} s {detail}",
                flush=True,
            )

    def in_flight(self, since: float, until: float) -> bool:
        """Whether a question was being answered at some time between the monotonic ``since``
        and ``until`` (or within ``QUESTION_TAIL_S`` after its answer: the RSS sampled then)."""
        for asked, answered in list(self.spans):
            if asked <= until and answered + QUESTION_TAIL_S >= since:
                return True
        return False

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind in ("what-if", "critical-path"):
            mine = [q for q in self.asked if q["kind"] == kind]
            took = sorted(q["seconds"] for q in mine)
            out[kind] = {
                "asked": len(mine),
                "answered": sum(1 for q in mine if q["status"] == 200),
                "median_s": took[len(took) // 2] if took else None,
                "max_s": took[-1] if took else None,
            }
        return out


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as response:
        body: dict[str, Any] = json.loads(response.read())
        return body


def _stop_serve(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _iso_to_unix(text: str | None) -> float | None:
    if not text:
        return None
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def soak(
    label: str,
    incremental: bool,
    args: argparse.Namespace,
    templates: list[Template],
    report_max_spans: int | None = None,
) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix=f"hourglass-soak-{label.split(',')[0]}-"))
    db = folder / "soak.duckdb"
    flag = {"HOURGLASS_INCREMENTAL_ANALYSIS": "true" if incremental else "false"}
    if report_max_spans is not None:
        flag["HOURGLASS_REPORT_MAX_SPANS"] = str(report_max_spans)
    if not incremental:  # the whole store at once, as every run was before: not its partitions
        flag["HOURGLASS_SERVE_PARTITIONS"] = "1"
    if args.memory_log:  # each stage's RSS of serve's processes, in serve.log (keep it: --keep)
        flag["HOURGLASS_MEMORY_LOG"] = "1"
    if args.retention is not None:  # the store stops growing once it holds this much of the run
        flag["HOURGLASS_RETENTION"] = f"{args.retention:g}s"
    if args.stored:
        from bench.analysis import GENERATE_CHUNK_SPANS

        started_seed = time.monotonic()
        seeded = seed_store(db, args.stored)
        hours = math.ceil(args.stored / GENERATE_CHUNK_SPANS)
        print(
            f"seeded the store with {seeded:,} spans ingested over the {hours} hour{'s' if hours > 1 else ''}"
            f" before the run ({time.monotonic() - started_seed:.0f} s)",
            flush=True,
        )
    serve_started = time.time()
    proc, addresses = start_serve(db, folder / "serve.log", env=flag)
    grpc_target, api = addresses["grpc"], addresses["api"]
    print(f"\n== {label}: serve pid {proc.pid}, {args.rate:,.0f} spans/s for {args.duration:g} s ({folder})")
    print(
        f"{'t s':>5} {'rss MiB':>8} {'server':>7} {'workers':>7} {'stored':>10} {'sent':>10} {'settled':>9} {'in report':>9} {'lag s':>6} {'refused':>7}  last run"
        f"  | server MiB: {'anon':>5} {'heap':>5} {'free':>5} {'duckdb':>6} {'ddb_res':>7} {'arrow':>5} {'py_kblk':>7}"
        f" {'file':>5} {'shmem':>5}"
    )
    load = Load(grpc_target, args.rate, templates)
    rows: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    last_generation = None
    started = time.monotonic()
    load.start()
    sampler = RssSampler(proc.pid)
    questions = Questions(api, args.questions) if args.questions > 0 else None
    if questions is not None:
        questions.start()
    taken = time.monotonic()
    try:
        while time.monotonic() - started < args.duration:
            time.sleep(max(0.0, args.every - (time.monotonic() - started) % args.every))
            now = time.time()
            rss, own, children = sampler.take()  # the highest since the last line
            # a question in flight since the last line: its transient peak is in this one
            asking = questions is not None and questions.in_flight(taken, time.monotonic())
            taken = time.monotonic()
            try:
                stats = _get(f"{api}/v1/stats")
                head = _get(f"{api}/v1/recommendations?limit=1")
            except OSError as exc:
                print(f"  (stats unavailable: {exc})")
                continue
            analysis = stats.get("analysis") or {}
            last_start = _iso_to_unix(analysis.get("last_started_at"))
            figures = analysis.get("incremental_round") or {}
            lag = None if last_start is None else now - last_start
            if figures.get("oldest_deferred_ingested_ns") and lag is not None:
                # settled traces the last round left for later (a backlog): the oldest has waited
                # since it settled (its last span's arrival + the settle time)
                settled_at = figures["oldest_deferred_ingested_ns"] / 1e9 + float(
                    analysis.get("settle_seconds") or 0
                )
                # (a trace of a seeded store, --stored, settled before serve started: it waits
                # from serve's start)
                lag = max(lag, now - max(settled_at, serve_started))
            row = {
                "t": round(time.monotonic() - started),
                "rss": rss,
                "server": own,
                "workers": children,
                "stored": stats.get("spans"),
                "sent": load.sent_spans,
                # traces the analysis has seen settle: extracted, or left for the next round
                "settled": figures.get("traces_extracted", 0) + figures.get("deferred_traces", 0)
                if incremental
                else None,
                "in_report": head.get("traces_analyzed"),
                "lag": lag,
                "refused": load.refused,
                "last_ms": analysis.get("last_duration_ms"),
                "asking": asking,
            }
            row["memory"] = {**server_parts(stats.get("server_memory")), **resident_files(proc.pid)}
            rows.append(row)
            print(
                f"{row['t']:>5} {rss / 2**20:>8.0f} {own / 2**20:>7.0f} {children / 2**20:>7.0f} {row['stored'] or 0:>10,} {row['sent']:>10,} "
                f"{'-' if row['settled'] is None else format(row['settled'], ','):>9} {row['in_report'] or 0:>9,} "
                f"{'-' if row['lag'] is None else format(row['lag'], '.0f'):>6} {row['refused']:>7}  "
                f"{row['last_ms'] or 0:>9,.0f} ms {'q' if asking else ' '}| {'':>11} "
                + " ".join(_mib(row["memory"].get(k), w) for k, w in MEMORY_COLUMNS),
                flush=True,
            )
            generation = analysis.get("generation")
            if generation and generation != last_generation:
                last_generation = generation
                round_row = round_phases(analysis, row["t"], stats.get("spans"))
                rounds.append(round_row)
                print(
                    f"{'':>6}round {generation} ({analysis.get('last_reason')}): {round_row['text']}",
                    flush=True,
                )
    finally:
        if questions is not None:
            questions.stop()
        sampler.stop()
        load.stop()
        _stop_serve(proc)
    elapsed = time.monotonic() - started
    summary = summarize(label, rows, load, elapsed, rounds)
    if questions is not None:
        summary["questions"] = questions.summary()
    print(
        f"== {label}: {summary['sent_spans_per_s']:,.0f} spans/s sent for {elapsed:.0f} s"
        + (f"; errors {load.errors[:3]}" if load.errors else "")
    )
    for line in growth(summary):
        print(f"   {line}")
    for line in verdicts(summary):
        print(f"   {line}")
    if not args.keep:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return summary


def seed_store(db: Path, spans: int) -> int:
    """Writes to ``db`` about ``spans`` spans of the load's shapes (``build_store``), a million
    an hour (``GENERATE_CHUNK_SPANS``), in ingest order, the newest ingested five minutes before
    now: the store of a staging target that has run for that many hours, which serve then starts
    on (a restart). Runs on it show what a round and serve's memory cost once the store has
    outgrown the report window (a store grown by the soak itself only reaches ~24M spans in 20
    minutes). Returns the spans stored."""
    from bench import analysis

    hours = math.ceil(spans / analysis.GENERATE_CHUNK_SPANS)
    newest = time.time_ns() - 300 * 10**9
    stored, _ = analysis.build_store(
        db, spans, shift_ns=lambda hour: newest - (hours - hour) * 3_600 * 10**9 - analysis.BASE_NS
    )
    return stored


def _spans(text: str) -> int:
    """``20M``, ``500k`` or a number of spans."""
    scale = {"k": 10**3, "m": 10**6}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


GIB_LIMIT = 2.0  # issue 11's targets
LAG_LIMIT_S = 60.0
FLAT_TOLERANCE = 0.10
# lines of minute 2 and of the last minute with no question in flight that the flat verdict needs
MIN_JUDGED_LINES = 3
QUESTION_TAIL_S = 1.0  # after an answer, its memory is already given back (``queries.release_memory``)


def _windows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of minute 2 and of the last minute (a run shorter than four minutes: its halves)."""
    end = rows[-1]["t"] if rows else 0
    if end >= 240:
        return [r for r in rows if 60 <= r["t"] <= 120], [r for r in rows if r["t"] > end - 60]
    half = len(rows) // 2
    return rows[:half], rows[half:]


def _slope_mib_per_min(rows: list[dict[str, Any]]) -> float | None:
    """Least-squares slope of RSS over time, from minute 2 on (a short run: all of it)."""
    end = rows[-1]["t"] if rows else 0
    chosen = [r for r in rows if r["t"] >= 120] if end >= 240 else rows
    if len(chosen) < 3:
        return None
    ts = [r["t"] / 60 for r in chosen]
    ys = [r["rss"] / 2**20 for r in chosen]
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var if var else None


def _highest_parts(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The highest of each server memory part over ``rows``, in MiB (None: never reported)."""
    out: dict[str, float | None] = {}
    for name, _ in MEMORY_COLUMNS:
        values = [r["memory"][name] for r in rows if r.get("memory", {}).get(name) is not None]
        out[name] = round(max(values) / 2**20, 1) if values else None
    return out


def _round_window(rounds: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The longest round seen within the time span of ``rows``, with its stored spans and phases."""
    if not rows:
        return None
    first, last = rows[0]["t"], rows[-1]["t"]
    inside = [r for r in rounds if first <= r["t"] <= last]
    if not inside:
        return None
    longest = max(inside, key=lambda r: r["seconds"])
    return {k: longest[k] for k in ("stored", "seconds", "stages", "phases")}


def summarize(
    label: str,
    rows: list[dict[str, Any]],
    load: Load,
    elapsed: float,
    rounds: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    # flatness is judged between questions (module doc): on the lines of minute 2 and of the
    # last minute with none in flight (those minutes taken of the whole run, not of those lines)
    between = [r for r in rows if not r.get("asking")]
    early, late = ([r for r in window if not r.get("asking")] for window in _windows(rows))
    lags = [r["lag"] for r in rows if r["lag"] is not None]
    rounds = rounds or []
    asking = [r for r in rows if r.get("asking")]
    half = (rows[-1]["t"] / 2) if rows else 0
    return {
        "server_mib_early": _highest_parts(early),
        "server_mib_late": _highest_parts(late),
        "round_early": _round_window(rounds, early),
        "round_late": _round_window(rounds, late),
        "rounds": len(rounds),
        "label": label,
        "sent_spans_per_s": load.sent_spans / elapsed if elapsed else 0.0,
        "peak_rss_gib": max((r["rss"] for r in rows), default=0) / GIB,
        "peak_server_gib": max((r["server"] for r in rows), default=0) / GIB,
        "peak_workers_gib": max((r["workers"] for r in rows), default=0) / GIB,
        "rss_early_gib": max((r["rss"] for r in early), default=0) / GIB,
        "rss_late_gib": max((r["rss"] for r in late), default=0) / GIB,
        "rss_slope_mib_per_min": _slope_mib_per_min(between),
        "lines": len(rows),
        "lines_between_questions": len(between),
        "judged_lines_early": len(early),
        "judged_lines_late": len(late),
        "question_peak_first_half_gib": max((r["rss"] for r in asking if r["t"] <= half), default=0) / GIB,
        "question_peak_second_half_gib": max((r["rss"] for r in asking if r["t"] > half), default=0) / GIB,
        "final_rss_gib": rows[-1]["rss"] / GIB if rows else 0.0,
        "max_lag_s": max(lags, default=None),
        "refused": load.refused,
        "errors": load.errors[:3],
    }


def growth(s: dict[str, Any]) -> list[str]:
    """What grew between the early and the late window: the server's memory by part and the
    longest round (time, stored spans, phases)."""
    early, late = s.get("server_mib_early") or {}, s.get("server_mib_late") or {}
    parts = ", ".join(
        f"{name} {early.get(name) if early.get(name) is not None else '-'} -> "
        f"{late.get(name) if late.get(name) is not None else '-'}"
        for name, _ in MEMORY_COLUMNS
    )
    lines = [f"server memory (highest, MiB), early -> late: {parts}"]
    for when in ("early", "late"):
        r = s.get(f"round_{when}")
        if r:
            phases = ", ".join(f"{k} {v:.1f}" for k, v in {**r["stages"], **r["phases"]}.items() if v >= 0.05)
            lines.append(
                f"longest round {when}: {r['seconds']:.1f} s at {r['stored'] or 0:,} stored ({phases})"
            )
    return lines


def verdicts(s: dict[str, Any]) -> list[str]:
    """One line per target of issue 11."""

    def mark(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    slope = s["rss_slope_mib_per_min"]
    # (too few lines between questions in either minute: not judged, so not a pass)
    judged = min(s.get("judged_lines_early", MIN_JUDGED_LINES), s.get("judged_lines_late", MIN_JUDGED_LINES))
    flat = (
        judged >= MIN_JUDGED_LINES
        and s["rss_early_gib"] > 0
        and s["rss_late_gib"] <= s["rss_early_gib"] * (1 + FLAT_TOLERANCE)
    )
    between = s.get("lines_between_questions", s.get("lines"))
    asked_lines = (s.get("lines") or 0) - (between or 0)
    question_peak = max(s.get("question_peak_first_half_gib", 0), s.get("question_peak_second_half_gib", 0))
    bound = question_bound_gib()
    lag = s["max_lag_s"]
    asked = [
        f"{mark(q['answered'] == q['asked'])} {kind} questions answered: {q['answered']} of {q['asked']}"
        + (f", median {q['median_s']:.1f} s, longest {q['max_s']:.1f} s" if q["asked"] else "")
        for kind, q in (s.get("questions") or {}).items()
    ]
    return [
        *asked,
        f"{mark(s['peak_rss_gib'] <= GIB_LIMIT)} RSS <= {GIB_LIMIT:g} GiB: peak {s['peak_rss_gib']:.2f} GiB "
        f"(server {s['peak_server_gib']:.2f}, workers {s['peak_workers_gib']:.2f}, each at its own peak)",
        f"{mark(flat)} RSS flat: highest {s['rss_early_gib']:.2f} GiB early (minute 2), {s['rss_late_gib']:.2f} GiB "
        f"late (last minute), slope {'n/a' if slope is None else format(slope, '+.1f')} MiB/min"
        + (f" (between questions: {between} of {s['lines']} lines)" if asked_lines else "")
        + (
            f"; too few lines without a question in flight to judge ({judged} in a minute, at least "
            f"{MIN_JUDGED_LINES}): ask less often"
            if judged < MIN_JUDGED_LINES
            else ""
        ),
        *(
            [
                f"{mark(question_peak <= bound)} RSS while questions are answered <= the memory budget + a "
                f"process' base ({bound:.2f} GiB): highest {s['question_peak_first_half_gib']:.2f} GiB in the "
                f"first half of the run, {s['question_peak_second_half_gib']:.2f} GiB in the second"
            ]
            if asked_lines
            else []
        ),
        f"{mark(lag is not None and lag <= LAG_LIMIT_S)} settled traces in the report within {LAG_LIMIT_S:g} s: "
        f"max lag {'n/a' if lag is None else format(lag, '.0f') + ' s'}",
        f"{mark(s['refused'] == 0)} ingest never refused: {s['refused']} refused",
    ]


def question_bound_gib() -> float:
    """What serve's questions plan for at most, in GiB: its default memory budget (the soak's
    serve gets no ``HOURGLASS_*`` of the caller: ``_process.start_serve``) plus a fresh process'
    base (``planning.question_room``: a question takes what the budget leaves over what serve and
    its worker hold)."""
    from hourglass.analysis.planning import PROCESS_BASE_BYTES
    from hourglass.settings import SETTING, parse_bytes

    return (parse_bytes(SETTING["memory_budget"].shown) + PROCESS_BASE_BYTES) / GIB


def _duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 10m")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20_000, help="spans per second (default 20000)")
    parser.add_argument("--duration", type=_duration, default=600.0, help="per phase, e.g. 10m (default)")
    parser.add_argument("--quick", action="store_true", help="2 minutes per phase")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between report lines")
    parser.add_argument("--no-baseline", action="store_true", help="skip the full re-analysis phase")
    parser.add_argument("--baseline-only", action="store_true", help="only the full re-analysis phase")
    parser.add_argument("--keep", action="store_true", help="keep the stores and serve logs")
    parser.add_argument(
        "--memory-log",
        action="store_true",
        help="serve notes each stage's RSS in its serve.log (HOURGLASS_MEMORY_LOG); implies --keep",
    )
    parser.add_argument(
        "--retention",
        type=_duration,
        default=None,
        help="serve's HOURGLASS_RETENTION, e.g. 5m: the store then holds about that much of the "
        "run and stops growing, so what still rises grows with time, not with the stored spans "
        "(default: serve's, 7 days)",
    )
    parser.add_argument(
        "--report-max-spans",
        type=lambda text: [int(v) for v in text.split(",")],
        default=None,
        help="one incremental phase per value of HOURGLASS_REPORT_MAX_SPANS, e.g. 0,4000000 "
        "(0: the whole retention; default: one phase with serve's default)",
    )
    parser.add_argument(
        "--stored",
        type=_spans,
        default=0,
        help="start serve on a store already holding this many spans (e.g. 20M) of the same shapes, "
        "ingested a million an hour before the run, as after hours or days of staging "
        "(default 0: an empty store)",
    )
    parser.add_argument(
        "--questions",
        type=float,
        default=0.0,
        help="every this many seconds, ask the running serve a question in turn: a what-if of its "
        "first recommendation over the whole store, the critical path of its busiest endpoint "
        "(default 0: none)",
    )
    args = parser.parse_args(argv)
    if args.memory_log:  # (the log is in serve.log, in the folder --keep keeps)
        args.keep = True
    if args.quick:
        args.duration = 120.0
    print(f"building the load: {TEMPLATE_SPANS:,} spans of mixed-shape traces ...", flush=True)
    templates = build_templates()
    print(f"{len(templates)} requests of ~{REQUEST_SPANS} spans (whole traces)")
    summaries = []
    if not args.baseline_only:
        for limit in args.report_max_spans or [None]:
            label = "incremental" if limit is None else f"incremental, HOURGLASS_REPORT_MAX_SPANS={limit}"
            if args.retention is not None:
                label += f", HOURGLASS_RETENTION={args.retention:g}s"
            if args.stored:
                label += f", {args.stored:,} spans stored before"
            summaries.append(soak(label, True, args, templates, limit))
    if not args.no_baseline:
        summaries.append(soak("full re-analysis (baseline)", False, args, templates))
    print("\nsummary (targets: RSS flat and <= 2 GiB, lag <= 60 s, nothing refused):")
    for s in summaries:
        print(f"  {s['label']}:")
        for line in verdicts(s):
            print(f"    {line}")
        for line in growth(s):
            print(f"    {line}")
        print("    " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
