"""error_propagation: a dependency's errors reach the root request with no fallback.

Rule
----
A *failed* span has status ERROR, or (status not explicitly OK and) an HTTP status >= 500 or 429.
For every failed span with no failed child (the deepest failure of its branch, the *leaf*), the
*dependency* that failed is found and attributed to the lowest service that could catch it:

* the leaf is an outgoing call (CLIENT or PRODUCER kind, or it carries ``db_system`` /
  ``messaging_destination``, or ``rpc_method`` on a non-INTERNAL span): the dependency is that call's target, and the service that
  made the call is the one that could catch it (``service`` = the leaf's service, ``operation`` =
  the operation that makes the call — the client span's parent —, ``targets`` = the peer /
  database / destination and the call's name);
* otherwise the error was born inside a service B: the dependency is B's entry span (the top of
  the unbroken same-service chain above the leaf, usually B's SERVER span) and the catcher is its
  caller — the parent of that entry span, in service A (``operation`` = the operation making that
  call: the parent of A's client span, or the parent itself when A has no client span). Errors
  born in the root's own service without any outgoing call are not dependency failures and are not
  reported; neither are errors that B handled itself (B's entry span did not fail).

The dependency's failure *propagated* when every ancestor of the dependency span up to the real
root (not an orphan) passes the error on: an ancestor is failed, or it is an INTERNAL span with
unset status and no HTTP status (it says nothing, so it cannot have contained the error) — and the
root itself is failed. The failure was *contained* (a fallback exists) when some ancestor, or the
root, succeeded.

A finding is one dependency signature (catcher service + calling operation + dependency) whose
failures propagated to the root in at least ``MIN_PROPAGATED_TRACES`` traces. Why: one failed
request may be bad luck; the same dependency repeatedly taking whole requests down means the
caller has no fallback (default value, cached copy, degraded response, circuit breaker).

False-positive protections
--------------------------
* Contained failures (a parent or the root succeeded) never count: that is a working fallback.
* Evidence that the *same* caller contains the dependency's failures in other traces lowers the
  confidence in proportion (the fallback exists but is not always used); a fallback used by *other*
  callers of the same dependency lowers it by a further 20 % and is named in the evidence.
* Orphan chains (an ancestor is missing) never count as reaching the root.
* Several failed spans of one dependency in one trace (retries) are one occurrence.

Numbers: ``requests_at_risk`` = root requests that failed because of the dependency; evidence holds
the dependency's call count, error count and error rate, contained traces (same caller / others),
the failing root operations, an exemplar chain of operations from the dependency to the root, and
the cost the ranking reads: ``failed_request_ms`` per occurrence (the failed request's duration: the
user waited that long for an error), ``failed_request_ms_total``/``_p50`` in the evidence.
No interventions: a fallback changes the outcome, not the latency, so no latency saving is claimed.

Confidence: (0.5 + 0.45 × volume) × consistency, volume = log10(failed requests + 1) / 2 capped at
1, consistency = failed / (failed + contained by the same caller); × 0.8 when other callers contain
the dependency's failures; within [0.05, 0.95].

Everything is vectorised: per-span flags in one polars pass (no strings materialised), names
gathered only for the failing rows, and numpy pointer doubling (``nxt = nxt[nxt]``, log2(depth) steps, no recursion) to find how far up
each failure travels and where each service's span chain begins.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors._common import (
    NearMissSink,
    Rows,
    call_target_expr,
    failed_expr,
    occurrence_keys,
    per_unit,
    url_host_expr,
)
from hourglass.analysis.model import Finding, Occurrences
from hourglass.analysis.repair import pointer_fixpoint
from hourglass.collector.schema import (
    KIND_CLIENT,
    KIND_INTERNAL,
    KIND_PRODUCER,
    KIND_UNSPECIFIED,
    STATUS_UNSET,
)

KIND = "error_propagation"
MIN_PROPAGATED_TRACES = 2  # one failed request can be bad luck; two or more is a pattern
OTHER_CALLER_FALLBACK_FACTOR = 0.8  # confidence factor when other callers contain the same dependency
CHAIN_DISPLAY_LIMIT = 12  # operations shown in the exemplar chain


def outgoing_call_expr() -> pl.Expr:
    """A span that calls something outside its service (whether or not the callee is traced)."""
    return (
        pl.col("kind").is_in([KIND_CLIENT, KIND_PRODUCER])
        | pl.col("db_system").is_not_null()
        | pl.col("rpc_method").is_not_null() & (pl.col("kind") != KIND_INTERNAL)
        | pl.col("messaging_destination").is_not_null()
    )


def _confidence(propagated: int, contained_same: int, contained_other: int) -> float:
    volume = min(1.0, math.log10(propagated + 1) / 2.0)  # 1 trace ≈ 0.15, 100 traces → 1.0
    consistency = propagated / (propagated + contained_same)
    value = (0.5 + 0.45 * volume) * consistency
    if contained_other:
        value *= OTHER_CALLER_FALLBACK_FACTOR
    return round(max(0.05, min(0.95, value)), 3)


SIGNATURE = ["catcher_service", "operation", "target_service", "target_operation"]
DEPENDENCY = ["target_service", "target_operation"]
IDENTITY = ["service", "name", "target"]  # a dependency span's identity, for its call volume


def extract(ctx: AnalysisContext) -> Rows:
    """Per-trace half: ``signatures`` and ``dependencies`` (traces whose failure propagated or was
    contained: partial counts, as every trace lies in one partition), ``occurrences`` (one row
    per signature and trace whose failure reached the root), ``reported`` (the dependency span
    identities behind them), ``chains`` (per signature, the exemplar chain of this part's first
    trace), ``volume`` (calls and errors per span identity) and ``roots`` (requests per root
    operation)."""
    spans = ctx.spans
    volume = _volume(spans)
    roots = ctx.traces.group_by("root_service", "root_name").agg(root_requests=pl.len())
    if not spans.select((failed_expr() & ~pl.col("is_root")).any()).item():
        return {"volume": volume, "roots": roots}

    # Flags over every span (no strings materialised); names are gathered later for the few rows that matter.
    flags = spans.select(
        "is_root",
        "orphan",
        failed=failed_expr(),
        outgoing=outgoing_call_expr(),
        silent=pl.col("kind").is_in([KIND_INTERNAL, KIND_UNSPECIFIED])
        & (pl.col("status_code") == STATUS_UNSET)
        & pl.col("http_status_code").is_null(),
        pid=pl.col("parent_row").fill_null(-1),
        service_code=pl.col("service").cast(pl.Categorical).to_physical(),
    )
    nid = np.arange(flags.height, dtype=np.int64)
    pid = flags["pid"].to_numpy().astype(np.int64)
    has_parent = pid >= 0
    parent_safe = np.where(has_parent, pid, nid)

    failed = flags["failed"].to_numpy()
    silent = flags["silent"].to_numpy()
    is_root = flags["is_root"].to_numpy()
    orphan = flags["orphan"].to_numpy()
    service_code = flags["service_code"].to_numpy()

    # How far up can an error travel? Through failed ancestors and silent non-root ones.
    passes_error = failed | (silent & ~is_root & has_parent)
    top_reached = pointer_fixpoint(np.where(has_parent & passes_error[parent_safe], parent_safe, nid))
    # Where does each span's unbroken same-service chain begin?
    same_service_up = has_parent & (service_code[parent_safe] == service_code)
    segment_top = pointer_fixpoint(np.where(same_service_up, parent_safe, nid))

    # Leaves: failed spans with no failed child.
    has_failed_child = np.zeros(len(nid), dtype=bool)
    has_failed_child[pid[failed & has_parent]] = True
    leaf = failed & ~has_failed_child & ~is_root
    outgoing = flags["outgoing"].to_numpy()

    # Dependency span D and the caller's call span C for each leaf.
    leaf_idx = np.flatnonzero(leaf)
    leaf_out = outgoing[leaf_idx]
    entry = segment_top[leaf_idx]
    dep = np.where(leaf_out, leaf_idx, entry)
    call = np.where(leaf_out, leaf_idx, pid[entry])
    usable = (call >= 0) & failed[dep]  # errors born in the root's own code, or handled inside B, drop
    leaf_idx, dep, call = leaf_idx[usable], dep[usable], call[usable]
    # The operation that makes the call: the call span's parent when the call is its own (client) span.
    caller = np.where(outgoing[call] & has_parent[call], parent_safe[call], call)
    if len(dep) == 0:
        return {"volume": volume, "roots": roots}
    top = top_reached[dep]
    propagated = is_root[top] & ~orphan[top] & failed[top]

    events = (
        pl.DataFrame(
            {"dep": dep, "call": call, "caller": caller, "propagated": propagated, "top": top},
            schema={
                "dep": pl.UInt32,
                "call": pl.UInt32,
                "caller": pl.UInt32,
                "propagated": pl.Boolean,
                "top": pl.UInt32,
            },
        )
        .unique("dep")
        .sort("dep")
    )  # deterministic order: same spans, same report
    rows = np.unique(np.concatenate([dep, call, caller]))
    # (``rows`` sorted and distinct, ``row`` each span's position: the rows ``spans[rows]`` gives,
    # filtered lazily so that only the columns selected are taken, not every span column)
    info = (
        spans.lazy()
        .filter(pl.col("row").is_in(pl.Series(rows, dtype=pl.UInt32).implode()))
        .select(
            "trace_id",
            "span_id",
            "service",
            "name",
            "depth",
            "root_duration_ns",
            nid=pl.col("row"),
            outgoing=outgoing_call_expr(),
            target=call_target_expr(),
            url_host=url_host_expr(),
        )
        .collect()
    )
    events = (
        events.join(info.rename(lambda c: f"dep_{c}"), left_on="dep", right_on="dep_nid")
        .join(info.rename(lambda c: f"call_{c}"), left_on="call", right_on="call_nid")
        .join(
            info.select("nid", caller_span_id="span_id", caller_name="name"), left_on="caller", right_on="nid"
        )
        .with_columns(
            trace_id=pl.col("dep_trace_id"),
            catcher_service=pl.col("call_service"),
            operation=pl.col("caller_name"),
            target_service=pl.when(pl.col("dep_outgoing"))
            .then(
                pl.when(pl.col("dep_target") != "")
                .then(pl.col("dep_target"))
                .otherwise(pl.coalesce(pl.col("dep_url_host"), pl.col("dep_name")))
            )
            .otherwise(pl.col("dep_service")),
            target_operation=pl.col("dep_name"),
        )
    )
    signature_cols, dependency_cols = SIGNATURE, DEPENDENCY
    signatures = (
        events.sort("trace_id", "dep")
        .group_by(signature_cols, maintain_order=True)
        .agg(
            propagated_traces=pl.col("trace_id").filter(pl.col("propagated")).n_unique(),
            contained_traces=pl.col("trace_id").filter(~pl.col("propagated")).n_unique(),
            # exemplars for a near miss: the first traces here and the first trace's spans
            traces=pl.col("trace_id").n_unique(),
            trace_ids=pl.col("trace_id").unique(maintain_order=True).head(5),
            span_ids=pl.concat_list("call_span_id", "dep_span_id").first(),
        )
    )
    dependencies = events.group_by(dependency_cols).agg(
        dependency_contained_traces=pl.col("trace_id").filter(~pl.col("propagated")).n_unique(),
    )
    reported = events.filter(pl.col("propagated"))
    reported_deps = reported.select(
        *signature_cols,
        pl.col("dep_service").alias("service"),
        pl.col("dep_name").alias("name"),
        pl.col("dep_target").alias("target"),
    ).unique()
    reported = reported.join(
        ctx.traces.select("trace_id", "root_name", "root_service"), on="trace_id", how="left"
    )
    occurrences = (
        reported.group_by([*signature_cols, "trace_id"])
        .agg(
            call_ids=pl.concat_list("caller_span_id", "call_span_id").explode().unique(maintain_order=True),
            dep_ids=pl.col("dep_span_id").unique(maintain_order=True),
            failed_dependency_spans=pl.len(),
            depth=pl.col("dep_depth").max(),
            root_name=pl.col("root_name").first(),
            root_service=pl.col("root_service").first(),
            exemplar_dep=pl.col("dep").min(),
            root_duration_ns=pl.col("dep_root_duration_ns").first(),
        )
        .sort("trace_id")
    )
    # The exemplar chain of each signature's first trace here; the decision keeps the first overall.
    firsts = occurrences.unique(subset=signature_cols, keep="first", maintain_order=True)
    chains = firsts.select(
        *signature_cols,
        "trace_id",
        chain=pl.Series(
            [_exemplar_chain(spans, parent_safe, has_parent, int(d)) for d in firsts["exemplar_dep"]],
            dtype=pl.List(pl.String),
        ),
    )
    return {
        "signatures": signatures,
        "dependencies": dependencies,
        "occurrences": occurrences.drop("exemplar_dep"),
        "reported": reported_deps,
        "chains": chains,
        "volume": volume,
        "roots": roots,
    }


def _volume(spans: pl.DataFrame) -> pl.DataFrame:
    """Calls and errors per span identity (service, name, call target) — over every span, since
    a dependency failing in one partition may be called without failing in another. Grouped by a
    64-bit hash of the identity, the names taken once per group."""
    keyed = spans.select("service", "name", target=call_target_expr(), failed=failed_expr()).with_columns(
        key=pl.struct(IDENTITY).hash()
    )
    return keyed.group_by("key").agg(pl.col(IDENTITY).first(), calls=pl.len(), errors=pl.col("failed").sum())


def decide(rows: Rows, notes: NearMissSink) -> list[Finding]:
    """Cross-trace half: traces taken down per signature, fallbacks seen, dependency volume."""
    signature_cols, dependency_cols = SIGNATURE, DEPENDENCY
    if rows.get("signatures") is None or rows["signatures"].is_empty():
        return []
    per_sig = (
        rows["signatures"]
        .with_columns(_first=pl.col("trace_ids").list.first())
        .sort("_first")
        .group_by(signature_cols, maintain_order=True)
        .agg(
            pl.col("propagated_traces", "contained_traces", "traces").sum(),
            trace_ids=pl.col("trace_ids")
            .list.explode(keep_nulls=False, empty_as_null=False)
            .unique()
            .sort()
            .head(5),
            span_ids=pl.col("span_ids").first(),
        )
    )
    per_dep = rows["dependencies"].group_by(dependency_cols).agg(pl.col("dependency_contained_traces").sum())

    per_sig = per_sig.join(per_dep, on=dependency_cols, how="left").with_columns(
        contained_by_other_callers=pl.col("dependency_contained_traces") - pl.col("contained_traces")
    )
    _note_near_misses(notes, per_sig, signature_cols)
    per_sig = per_sig.filter(pl.col("propagated_traces") >= MIN_PROPAGATED_TRACES)
    if per_sig.height == 0:
        return []

    reported = rows["reported"].unique().join(per_sig.select(signature_cols), on=signature_cols, how="semi")
    # Dependency call volume and error rate, over every span with the dependency span's identity.
    volume = rows["volume"].group_by("key").agg(pl.col(IDENTITY).first(), pl.col("calls", "errors").sum())
    dep_volume = (
        reported.join(volume.drop("key"), on=IDENTITY, how="left")
        .group_by(signature_cols)
        .agg(dependency_calls=pl.col("calls").sum(), dependency_errors=pl.col("errors").sum())
    )
    occurrences = rows["occurrences"].join(per_sig.select(signature_cols), on=signature_cols, how="semi")
    occurrences = occurrences.sort("trace_id")
    # every finding's occurrence keys hashed at once, before the split into findings
    occurrences = occurrences.with_columns(
        occurrence_keys(occurrences, ["trace_id", "call_ids", "dep_ids"]).alias("occurrence_key")
    )
    chains = rows["chains"].sort("trace_id").unique(subset=signature_cols, keep="first", maintain_order=True)
    root_totals = rows["roots"].group_by("root_service", "root_name").agg(pl.col("root_requests").sum())

    findings: list[Finding] = []
    occurrence_groups = occurrences.partition_by(signature_cols, as_dict=True)
    stats = per_sig.join(dep_volume, on=signature_cols, how="left")
    for row in stats.iter_rows(named=True):  # one iteration per finding, not per span
        key = tuple(row[c] for c in signature_cols)
        group = occurrence_groups[key]
        by_root = (
            group.group_by("root_service", "root_name")
            .agg(failed_requests=pl.len())
            .join(root_totals, on=["root_service", "root_name"], how="left")
            .sort(["failed_requests", "root_service", "root_name"], descending=[True, False, False])
        )
        occurrence_list = _occurrences(group)
        propagated_traces = int(row["propagated_traces"])
        failed_ms = (group["root_duration_ns"].fill_null(0) / 1e6).to_numpy()
        calls = int(row["dependency_calls"] or 0)
        errors = int(row["dependency_errors"] or 0)
        evidence: dict[str, Any] = {
            "failed_root_requests": propagated_traces,
            "contained_traces": int(row["contained_traces"]),
            "contained_by_other_callers_traces": int(row["contained_by_other_callers"]),
            "fallback_seen": bool(row["contained_traces"] or row["contained_by_other_callers"]),
            "failed_request_ms_total": round(float(failed_ms.sum()), 3),
            "failed_request_ms_p50": round(float(np.median(failed_ms)) if failed_ms.size else 0.0, 3),
            "dependency_calls": calls,
            "dependency_errors": errors,
            "dependency_error_rate": round(errors / calls, 4) if calls else None,
            "root_operations": [
                {
                    "service": r["root_service"],
                    "operation": r["root_name"],
                    "failed_requests": int(r["failed_requests"]),
                    "requests": int(r["root_requests"] or 0),
                }
                for r in by_root.head(5).iter_rows(named=True)
            ],
            "chain": chains.join(group.head(1).select(signature_cols), on=signature_cols, how="semi")[
                "chain"
            ][0].to_list(),
            "trace_ids": group["trace_id"].head(10).to_list(),
            "span_ids": [sid for o in occurrence_list[:10] for sid in o.span_ids[:2]],
        }
        findings.append(
            Finding(
                kind=KIND,
                category="fault_tolerance",
                service=row["catcher_service"],
                operation=row["operation"],
                targets=[{"service": row["target_service"], "operation": row["target_operation"]}],
                occurrences=occurrence_list,
                confidence=_confidence(
                    propagated_traces, int(row["contained_traces"]), int(row["contained_by_other_callers"])
                ),
                evidence=evidence,
                requests_at_risk=propagated_traces,
            )
        )
    findings.sort(key=lambda f: (-(f.requests_at_risk or 0), f.signature))
    return findings


def _occurrences(group: pl.DataFrame) -> Occurrences:
    """One occurrence per failed request of ``group``: its call spans then its dependency spans
    (each once, first seen first), no intervention, the failure's figures as numbers (ms divided
    by numpy, as Python's ``/``); made in columns, no object per occurrence."""
    figures = group.select(
        pl.col("failed_dependency_spans"),
        pl.col("depth").fill_null(0),
        pl.col("root_duration_ns").fill_null(0),
    )
    root_ms = per_unit(figures, {"ms": ("root_duration_ns", 1e6)})["ms"]
    return Occurrences.from_columns(
        group["trace_id"],
        group.select(pl.concat_list("call_ids", "dep_ids").list.unique(maintain_order=True)).to_series(),
        intervention=None,
        numbers={
            **per_unit(
                figures,
                {"failed_dependency_spans": ("failed_dependency_spans", 1), "dependency_depth": ("depth", 1)},
            ),
            "root_duration_ms": root_ms,
            # The cost the ranking reads: the failed request ran this long for an error.
            "failed_request_ms": root_ms.copy(),
        },
        keys=group["occurrence_key"],
    )


def detect(ctx: AnalysisContext) -> list[Finding]:
    return decide(extract(ctx), ctx)


def _note_near_misses(notes: NearMissSink, per_sig: pl.DataFrame, signature_cols: list[str]) -> None:
    """Near misses, one per dependency signature below ``MIN_PROPAGATED_TRACES``: failures that a
    fallback contained, or that reached the root in too few requests."""
    below = per_sig.filter(pl.col("propagated_traces") < MIN_PROPAGATED_TRACES).sort(signature_cols)
    for r in below.iter_rows(named=True):  # one per signature, not per span
        propagated, contained = int(r["propagated_traces"]), int(r["contained_traces"])
        target = f"{r['target_service']} {r['target_operation']}"
        if propagated == 0:
            reason = f"failures of {target} contained in {contained} traces: a fallback works"
        else:
            reason = (
                f"failure of {target} reached the root in {propagated} trace < {MIN_PROPAGATED_TRACES} "
                f"(contained in {contained}): one failed request may be bad luck"
            )
        notes.note_near_miss(
            KIND,
            str(r["catcher_service"]),
            str(r["operation"]),
            reason,
            trace_ids=r["trace_ids"] or (),
            span_ids=r["span_ids"] or (),
            traces=int(r["traces"] or 0),
        )


def _exemplar_chain(
    spans: pl.DataFrame, parent_safe: np.ndarray, has_parent: np.ndarray, start: int
) -> list[str]:
    """``service: operation`` from the failing dependency up to the root, for one exemplar span
    (a walk along one trace's ancestors, bounded by the display limit)."""
    chain: list[int] = [start]
    while has_parent[chain[-1]] and len(chain) < CHAIN_DISPLAY_LIMIT:
        chain.append(int(parent_safe[chain[-1]]))
    rows = spans.select("service", "name")[chain]
    labels = [f"{s}: {n}" for s, n in rows.iter_rows()]
    if has_parent[chain[-1]]:
        labels.append("…")
    return labels
