"""The ``design`` of a recommendation: what a senior engineer of concurrent and distributed systems
would write before changing the code.

``build_design(rec, facts)`` returns, deterministically and from the numbers only::

    {"pattern": {"name", "parameters": {...}, "summary"},
     "rationale", "dependencies", "consistency", "failure_handling", "verification", "tests",
     "predicted": {root_ms_p50_before, root_ms_p95_before, root_ms_p50_after, root_ms_p95_after,
                   critical_path_after: [{service, operation, self_ms}]},
     "pseudocode": {"language", "code"},
     "sequence": {"before", "after", "trace_id"}}

``rec`` is the report's recommendation (numbers filled in); ``facts`` come from
:func:`hourglass.analysis.sequence.design_facts` (the service's language, the exemplar's sequence diagrams,
the what-if's predicted root latencies, the measured durations of the calls involved). Every
number in the prose is one of: the recommendation's evidence and impact, ``pattern.parameters`` or
``predicted`` — so a reader (and the agent's grounding check) can trace each one back.

The pattern and its parameters follow the evidence:

==========================  ==============================================================  ====================
kind                        pattern                                                         parameters from
==========================  ==============================================================  ====================
serialized_calls            scatter-gather with one shared deadline                         calls' p99 → deadline
n_plus_one                  batch (``WHERE id IN``, batch endpoint, DataLoader) / memoize   calls_max → batch size
fanout_concurrency_limit    bounded worker pool sized to the fan-out (+ bulkhead if shared)  n_max → pool size k
fanout_straggler            hedged request after the p95 + per-branch deadline (tail);      branches' p95, p99
                            rebalance the hot branch (skew)
lock_contention             shorter critical section, lock split / optimistic concurrency   hold and wait times
retry_without_backoff       exponential backoff with jitter, attempt cap and retry budget   call p50 → base delay
error_propagation           fallback + circuit breaker                                      error rate
missing_timeout             timeout at the measured healthy p99, deadline propagation       suggested_timeout_ms
concurrent (N identical      one batch call                                                  calls_max → batch size
concurrent calls)
other kinds                 by category: run concurrently / contain the failure             —
==========================  ==============================================================  ====================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hourglass.analysis.pseudocode import pseudocode
from hourglass.analysis.sequence import fmt_ms as ms

Rec = Mapping[str, Any]
# The prose sections of a design, in order, with the heading the Markdown and HTML reports give them.
DESIGN_SECTIONS = (
    ("rationale", "Why this pattern"),
    ("dependencies", "Dependencies and races"),
    ("consistency", "Consistency"),
    ("failure_handling", "Failure handling"),
    ("verification", "Verification"),
    ("tests", "Tests"),
)
PROSE_FIELDS = tuple(key for key, _ in DESIGN_SECTIONS)


def pct(value: Any) -> str:
    return "an unknown share" if value is None else f"{float(value) * 100:.0f} %"


def count(value: Any) -> str:
    """A count for people: 8 rather than 8.0, one decimal only when it is not whole (6.5)."""
    if value is None:
        return "several"
    v = float(value)
    return f"{v:.0f}" if v.is_integer() else f"{v:.1f}"


def q(text: Any) -> str:
    return "`" + str(text).replace("`", "'") + "`"


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v == v else None


def _targets(rec: Rec) -> list[dict[str, str]]:
    return [dict(t) for t in rec.get("targets") or []]


def _target_names(rec: Rec, limit: int = 3) -> str:
    names = [q(t.get("operation")) for t in _targets(rec)][:limit]
    if not names:
        return "the calls"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _call_ops(rec: Rec, facts: Mapping[str, Any]) -> list[str]:
    ops = [str(t.get("operation")) for t in _targets(rec) if t.get("operation")]
    if not ops:
        ops = [str(c.get("operation")) for c in (facts.get("exemplar") or {}).get("calls") or []]
    return list(dict.fromkeys(ops))


def _where(rec: Rec) -> str:
    return f"{q(rec.get('operation'))} in {q(rec.get('service'))}"


def _stats(facts: Mapping[str, Any]) -> dict[str, Any]:
    return dict(facts.get("call_stats") or {})


# --- verification (shared) ---------------------------------------------------------------------


def _verification(rec: Rec, facts: Mapping[str, Any], watch: str) -> str:
    ex = facts.get("exemplar") or {}
    root = ex.get("root") or {}
    parts: list[str] = []
    where = f"{q(root.get('operation'))} in {q(root.get('service'))}" if root else _where(rec)
    if facts.get("root_ms_p50_after") is not None:
        parts.append(
            f"Watch the root span {where}: over the {count(rec.get('traces_affected'))} affected traces the "
            f"what-if predicts its p50 to fall from {ms(facts['root_ms_p50_before'])} to "
            f"{ms(facts['root_ms_p50_after'])} and its p95 from {ms(facts['root_ms_p95_before'])} to "
            f"{ms(facts['root_ms_p95_after'])}."
        )
    else:
        parts.append(f"Watch the root span {where}; the what-if predicts no latency change for this finding.")
    path = ex.get("critical_path_after") or []
    if path and facts.get("root_ms_p50_after") is not None:
        names = ", ".join(f"{q(p['operation'])} ({p['service']}, {ms(p['self_ms'])})" for p in path[:3])
        parts.append(f"In the exemplar trace the new critical path then runs mostly through {names}.")
    parts.append(watch)
    return " ".join(parts)


# --- per kind ----------------------------------------------------------------------------------

Design = dict[str, Any]


def serialized_calls(rec: Rec, facts: Mapping[str, Any]) -> tuple[Design, str, dict[str, Any]]:
    ev = rec.get("evidence") or {}
    st = _stats(facts)
    n = _num(ev.get("calls_p50")) or len(_targets(rec)) or 2
    deadline = st.get("p99_ms")
    params = {"concurrent_calls": n, "shared_deadline_ms": deadline}
    orders = int(ev.get("distinct_orders") or 0)
    overlapping = int(ev.get("overlapping_instances") or 0)
    taking = ev.get("calls_taking_input")
    if orders > 1 or overlapping > 0:
        independence = (
            f"The traces support independence: {count(orders)} different call orders were seen"
            if orders > 1
            else f"The calls already overlap in {count(overlapping)} requests"
        ) + ", so no call waits for another's result today."
    else:
        independence = (
            "The calls always run in the same order and never overlap, so the traces cannot rule out that "
            "one call uses another's result: read the code before starting them together."
        )
    inputs = (
        f" {count(taking)} of the calls take input that could come from an earlier call; check those first."
        if taking
        else ""
    )
    design: Design = {
        "pattern": {
            "name": "scatter-gather with one shared deadline",
            "parameters": params,
            "summary": f"Start the {count(n)} calls together and wait for all of them under one deadline"
            + (f" of {ms(deadline)} (the calls' measured p99)." if deadline else "."),
        },
        "rationale": (
            f"{_where(rec)} spends {ms(ev.get('serial_ms_p50'))} at the median on {_target_names(rec)} one after "
            f"another; run together the block costs only its slowest call, which saves "
            f"{ms((rec.get('impact') or {}).get('saved_ms_p50'))} at the root at p50. {independence}"
        ),
        "dependencies": (
            f"{independence}{inputs} Starting the calls together changes their order: any side effect one call "
            "relies on from another (a write read back, a reservation before a charge) must be made explicit or "
            "the dependent call kept after the one it needs. Shared state in the caller (a request-scoped "
            "object, a non-thread-safe client) must not be mutated from the concurrent branches."
        ),
        "consistency": (
            "No change for reads: each call sees the same data it would have seen a few milliseconds apart. If "
            "one of the calls writes, the others may now read before that write lands (no read-your-writes "
            "across them); keep such a pair sequential."
        ),
        "failure_handling": (
            "All calls share one deadline"
            + (f" ({ms(deadline)})" if deadline else "")
            + "; when one fails or the deadline passes, cancel the others and either fail fast with the first "
            "error or return the parts that succeeded, marked partial, if the page or API can do without the "
            "missing part. Retries stay per call and inside the shared deadline."
        ),
        "tests": (
            "Unit-test the handler with fakes whose latency and failure are scripted: all succeed; one fails "
            "(the others are cancelled, the caller returns its error or partial result); one hangs past the "
            "deadline. Run a concurrency test that the branches do not share mutable state (race detector, "
            f"thread sanitizer). Load-test {_target_names(rec)}: they now receive their calls at the same "
            "moment instead of spread out, so their peak concurrency rises."
        ),
    }
    return (
        design,
        "scatter_gather",
        {"calls": _call_ops(rec, facts), "deadline_ms": deadline, "caller": rec.get("operation")},
    )


def n_plus_one(rec: Rec, facts: Mapping[str, Any]) -> tuple[Design, str, dict[str, Any]]:
    ev = rec.get("evidence") or {}
    calls = ev.get("calls_p50")
    same = ev.get("different_parameters") is False
    statement = ev.get("statement") or (_targets(rec) or [{}])[0].get("operation") or "the repeated call"
    target_service = (_targets(rec) or [{}])[0].get("service") or "the downstream"
    batch = ev.get("calls_max")
    if same:
        params = {"calls_per_request": calls}
        pattern = {
            "name": "request-scoped memoization",
            "parameters": params,
            "summary": f"Call {q(statement)} once per request and reuse the result instead of {count(calls)} times.",
        }
        family = "memoize"
    else:
        params = {"batch_size": batch, "calls_per_request": calls}
        pattern = {
            "name": "batch call (WHERE id IN (…) / batch endpoint / DataLoader)",
            "parameters": params,
            "summary": f"Replace the {count(calls)} calls to {q(statement)} by one batched call for up to {count(batch)} ids.",
        }
        family = "batch"
    design: Design = {
        "pattern": pattern,
        "rationale": (
            f"{_where(rec)} runs {q(statement)} against {target_service} {count(calls)} times per request at the "
            f"median (up to {count(batch)}), one after another; each call takes {ms(ev.get('call_ms_p50'))} and "
            f"together they take {ms(ev.get('serial_ms_p50'))}. Most of that is per-call overhead (round trip, "
            "parse, plan) that one batched call pays once: running them concurrently would only hide it and "
            f"multiply the load on {target_service}."
        ),
        "dependencies": (
            "The ids must be known before the loop starts (they usually come from the parent row set); if "
            "a later call needs an earlier call's result the loop is a chain, not an N+1, and batching does not "
            "apply. The batched query must return rows for all ids in one result and the code must map them "
            "back to their parents (missing ids included); order is no longer guaranteed."
        ),
        "consistency": (
            "Stronger, not weaker: one query reads all rows at one snapshot, where the loop read each row at a "
            "slightly different moment. A memoized value is reused only within one request, so no stale data "
            "leaks across requests."
        ),
        "failure_handling": (
            "One failure now fails the whole batch: retry the batch as a unit (it is a read, so idempotent) and "
            f"bound it with the deadline the loop had. Cap the batch at {count(batch)} ids (the largest loop seen) "
            "or split larger id lists into chunks so one request cannot build an unbounded IN list."
        ),
        "tests": (
            f"Assert the number of calls to {target_service} per request (a query counter or an ORM assertion such "
            "as assertNumQueries) is one; test the mapping with duplicate, missing and empty id lists; test the "
            f"largest batch ({count(batch)} ids) for the query plan (index use) and the response size."
        ),
    }
    return (
        design,
        family,
        {"statement": statement, "batch_size": batch, "calls": _call_ops(rec, facts), "target": statement},
    )


def fanout_concurrency_limit(rec: Rec, facts: Mapping[str, Any]) -> tuple[Design, str, dict[str, Any]]:
    ev = rec.get("evidence") or {}
    k = ev.get("k")
    n_max = ev.get("n_max") or ev.get("n_p50")
    shared = bool(ev.get("shared_across_traces"))
    params = {"current_limit": k, "pool_size": n_max}
    name = "bounded worker pool sized to the fan-out" + (" with a per-request bulkhead" if shared else "")
    design: Design = {
        "pattern": {
            "name": name,
            "parameters": params,
            "summary": f"Raise the limit from {count(k)} to {count(n_max)} (the widest fan-out seen) for these calls"
            + (
                "; give each request its own bounded share so one request cannot starve the others."
                if shared
                else "."
            ),
        },
        "rationale": (
            f"{_where(rec)} sends {count(ev.get('n_p50'))} calls to {_target_names(rec)} at the median but runs at "
            f"most {count(k)} at a time, so later calls queue for {ms(ev.get('queued_ms_p50'))} at the median. "
            f"A pool of {count(n_max)} lets the whole fan-out run in one wave; the what-if saves "
            f"{ms((rec.get('impact') or {}).get('saved_ms_p50'))} at the root at p50."
        ),
        "dependencies": (
            "The calls of one fan-out are already concurrent, so no new data dependency appears; what changes is "
            f"the number in flight. Check that the downstream ({_target_names(rec)}) and any connection pool "
            "between (HTTP client, database pool) allow that many concurrent calls, and that the per-call code "
            "holds no shared mutable state."
        ),
        "consistency": "No change: the same calls run with the same inputs, only sooner.",
        "failure_handling": (
            "Keep the limit (a bigger bound, not none) so one huge request cannot open unbounded connections; "
            "on a failed call cancel the rest of the fan-out or collect partial results, as today; the caller's "
            "deadline bounds the whole wave."
            + (
                " A shared pool needs a bulkhead per request or tenant so one burst cannot fill it."
                if shared
                else ""
            )
        ),
        "tests": (
            f"Load-test {_target_names(rec)} at {count(n_max)} concurrent calls per request times the expected "
            "concurrent requests: the fan-out multiplies its peak load (capacity risk). Assert in a test that at "
            f"most {count(n_max)} calls are in flight at once, and inject a slow call to check the deadline."
        ),
    }
    return design, "bounded_pool", {"k": n_max, "calls": _call_ops(rec, facts)}


def fanout_straggler(rec: Rec, facts: Mapping[str, Any]) -> tuple[Design, str, dict[str, Any]]:
    ev = rec.get("evidence") or {}
    st = _stats(facts)
    skew = ev.get("pattern") == "skew"
    hedge_after = st.get("p95_ms")
    deadline = st.get("p99_ms")
    params: dict[str, Any] = {"hedge_after_ms": hedge_after, "branch_deadline_ms": deadline}
    if skew:
        params = {
            "slow_branch": ev.get("slow_branch"),
            "slow_branch_share": ev.get("slow_branch_share"),
            **params,
        }
        pattern = {
            "name": "rebalance the hot branch (plus a per-branch deadline)",
            "parameters": params,
            "summary": f"Move load off {q(ev.get('slow_branch'))}, the slow branch in {pct(ev.get('slow_branch_share'))} of "
            f"fan-outs; meanwhile bound each branch at {ms(deadline)}.",
        }
    else:
        pattern = {
            "name": "hedged request after the p95, per-branch deadline",
            "parameters": params,
            "summary": f"Send a second copy of a branch call to another replica when it has not answered after "
            f"{ms(hedge_after)} (the branches' p95); give up on a branch at {ms(deadline)} (their p99).",
        }
    design: Design = {
        "pattern": pattern,
        "rationale": (
            f"{_where(rec)} fans out to {count(ev.get('branches_p50'))} branches of {_target_names(rec)} and waits "
            f"for the slowest: {ms(ev.get('slowest_branch_ms_p50'))} against a median branch of "
            f"{ms(ev.get('median_branch_ms_p50'))}. "
            + (
                f"The same branch is slow in {pct(ev.get('slow_branch_share'))} of fan-outs, a skew: hedging would "
                "only double the load on a hot shard, so the fix is to rebalance it."
                if skew
                else "A different branch is slow each time, a random tail: a hedged copy after the p95 cuts the tail "
                "for about one extra call in twenty."
            )
        ),
        "dependencies": (
            "Hedging is safe only for idempotent reads: the same request may run twice on two replicas. "
            "Writes need an idempotency key or must not be hedged. Rebalancing moves keys between branches, so "
            "routing and caches keyed by shard must follow."
        ),
        "consistency": (
            "Two replicas may answer from slightly different states (replication lag): a hedged read can be "
            "staler than the primary's; for read-your-writes after a user's own write, send it to the primary. "
            "Partial results (a branch past its deadline) must be flagged to the caller."
        ),
        "failure_handling": (
            f"Each branch gets its own deadline ({ms(deadline)}); the fan-out returns the branches that answered "
            "and marks the rest missing, or fails when a required branch is missing. Hedged copies count "
            "against a hedge budget (for example a share of calls) so an overloaded tier is not doubled."
        ),
        "tests": (
            "Inject latency into one branch (fault injection, e.g. a delay proxy) and check the caller returns at "
            "the hedge or the deadline; inject latency into every branch to check the hedge budget caps the extra "
            f"load; load-test {_target_names(rec)} with hedging on."
        ),
    }
    family = "partial" if skew else "hedge"  # never hedge onto a hot shard
    return (
        design,
        family,
        {"hedge_after_ms": hedge_after, "deadline_ms": deadline, "calls": _call_ops(rec, facts)},
    )


def lock_contention(rec: Rec, facts: Mapping[str, Any]) -> tuple[Design, str, dict[str, Any]]:
    ev = rec.get("evidence") or {}
    resource = ev.get("resource") or (_targets(rec) or [{}])[0].get("operation") or "the shared resource"
    params = {
        "resource": resource,
        "hold_ms_p50": ev.get("hold_ms_p50"),
        "wait_ms_p50": ev.get("wait_ms_p50"),
        "queue_depth_p50": ev.get("queue_depth_p50") or ev.get("peers_p50"),
    }
    depth = params["queue_depth_p50"]
    design: Design = {
        "pattern": {
            "name": "shorter critical section, then a finer lock (per key) or optimistic concurrency",
            "parameters": params,
            "summary": f"Hold {q(resource)} only for the write itself (it is held {ms(ev.get('hold_ms_p50'))} at the "
            "median today), and lock per key or use a version check instead of one lock for all.",
        },
        "rationale": (
            f"{_where(rec)} waits {ms(ev.get('wait_ms_p50'))} at the median for {q(resource)}"
            + (
                f", {pct(ev.get('wait_share_p50'))} of its time"
                if ev.get("wait_share_p50") is not None
                else ""
            )
            + (f", queueing behind about {count(depth)} requests" if depth else "")
            + f". Each holder keeps it {ms(ev.get('hold_ms_p50'))}, so waiting grows with every request in the "
            "queue: a convoy. Shortening the hold time shortens every waiter's wait; a finer lock removes the "
            "queue for requests that touch different keys."
        ),
        "dependencies": (
            "What the lock protects must stay protected: list the invariants (balance never negative, one "
            "journal entry per transfer) and keep every read that decides the write inside the section, or "
            "re-check it there. Work moved out of the lock (remote calls, computation) must not depend on state "
            "another holder can change. Per-key locks need one global order when a request takes two keys "
            "(deadlock)."
        ),
        "consistency": (
            "Unchanged with a shorter section. With optimistic concurrency a writer can lose the race and must "
            "re-read and retry; readers still see committed states only."
        ),
        "failure_handling": (
            "Bound the wait for the lock (lock timeout or NOWAIT with a retry) so a stuck holder fails requests "
            "quickly instead of queueing all of them; optimistic conflicts retry with a small jittered backoff and "
            "a cap."
        ),
        "tests": (
            "A concurrency test with many parallel requests on one key and on different keys: the invariant "
            "holds and the per-key case no longer queues. Run it with a race detector; measure the wait time "
            "spans after the change."
        ),
    }
    return design, "lock", {"resource": resource}


def retry_without_backoff(rec: Rec, facts: Mapping[str, Any]) -> tuple[Design, str, dict[str, Any]]:
    ev = rec.get("evidence") or {}
    st = _stats(facts)
    base = st.get("p50_ms")
    attempts = 3
    params = {"base_delay_ms": base, "max_attempts": attempts, "retry_budget_share": 0.1}
    design: Design = {
        "pattern": {
            "name": "retry with exponential backoff, full jitter, an attempt cap and a retry budget",
            "parameters": params,
            "summary": "Wait a random time up to "
            + (f"{ms(base)} (the call's median duration)" if base else "the call's median duration")
            + " doubled per attempt, stop after 3 attempts, and stop retrying when retries exceed 10 % of calls.",
        },
        "rationale": (
            f"{_where(rec)} retries {_target_names(rec)} "
            + ("after the same short wait" if ev.get("pattern") == "constant_short_delay" else "at once")
            + f": {count(ev.get('attempts_per_burst_p50'))} attempts per burst at the median (up to "
            f"{count(ev.get('attempts_per_burst_max'))}), {ms(ev.get('gap_ms_p50'))} apart. A dependency that is "
            "failing because it is overloaded gets more load exactly when it has the least capacity."
        ),
        "dependencies": (
            "Retry only idempotent operations, or send an idempotency key the dependency honours: a retried "
            "payment or write that succeeded but timed out must not run twice. Retry only errors that can "
            "succeed later (timeouts, 503, UNAVAILABLE, 429 with its Retry-After), never 4xx validation errors."
        ),
        "consistency": (
            "With an idempotency key, at-most-once effect stays; without one, a retry can duplicate a write "
            "(at-least-once). Backoff delays the moment the effect lands but not its order for one request."
        ),
        "failure_handling": (
            "Give up after the attempt cap or the caller's deadline, whichever is first, and return a clear error; "
            "a retry budget (retries as a share of calls) and a circuit breaker stop retries when the "
            "dependency is down, so retries cannot amplify an outage."
        ),
        "tests": (
            f"Fault-inject 503s from {_target_names(rec)}: assert the attempt count, growing randomised gaps and "
            "that the budget stops retries during a full outage; test that non-retryable errors are not retried; "
            "a load test with the dependency degraded shows the retry traffic stays bounded."
        ),
    }
    return design, "retry", {"base_ms": base, "attempts": attempts, "calls": _call_ops(rec, facts)}


def error_propagation(rec: Rec, facts: Mapping[str, Any]) -> tuple[Design, str, dict[str, Any]]:
    ev = rec.get("evidence") or {}
    params = {
        "dependency_error_rate": ev.get("dependency_error_rate"),
        "failed_root_requests": ev.get("failed_root_requests", ev.get("requests_at_risk")),
    }
    design: Design = {
        "pattern": {
            "name": "fallback (degraded response) with a circuit breaker",
            "parameters": params,
            "summary": f"Catch failures of {_target_names(rec)} in {q(rec.get('operation'))}, answer from a fallback "
            "(cached, default or partial data) and open a breaker while the dependency keeps failing.",
        },
        "rationale": (
            f"Failures of {_target_names(rec)} reach the user through {_where(rec)} with no fallback: "
            f"{count(params['failed_root_requests'])} failed requests; the dependency fails "
            f"{pct(ev.get('dependency_error_rate'))} of its calls. "
            + (
                "Other callers already contain these failures, so a fallback exists elsewhere in the system."
                if ev.get("fallback_seen")
                else "No caller contains them today."
            )
        ),
        "dependencies": (
            "Decide per response field whether it is optional: only optional data may come from a fallback. A "
            "fallback must not write (no side effects hidden behind a cached answer), and the breaker's state is "
            "shared by all requests of one instance."
        ),
        "consistency": (
            "A cached or default answer is stale by design (eventual): mark it in the response (a header or a "
            "field) so clients and caches know it is degraded, and never serve it for data the user just wrote."
        ),
        "failure_handling": (
            "Closed: calls pass and failures are counted. Open (error rate well above the normal one): calls fail "
            "fast to the fallback without reaching the dependency. Half-open: a few probes decide. The request "
            "returns a partial response with a clear status when required data is missing."
        ),
        "tests": (
            f"Fault-inject errors and timeouts from {_target_names(rec)}: the root answers with the fallback, the "
            "breaker opens and then closes when the dependency recovers; a test that required data still fails "
            "the request."
        ),
    }
    return design, "breaker", {"calls": _call_ops(rec, facts)}


def missing_timeout(rec: Rec, facts: Mapping[str, Any]) -> tuple[Design, str, dict[str, Any]]:
    ev = rec.get("evidence") or {}
    timeout = ev.get("suggested_timeout_ms") or ev.get("p99_healthy_ms")
    params = {"timeout_ms": timeout, "healthy_p99_ms": ev.get("p99_healthy_ms")}
    design: Design = {
        "pattern": {
            "name": "timeout at the measured healthy p99, with deadline propagation",
            "parameters": params,
            "summary": f"Bound calls to {_target_names(rec)} at {ms(timeout)} and pass the request's remaining "
            "deadline downstream so abandoned work stops.",
        },
        "rationale": (
            f"Calls from {_where(rec)} to {_target_names(rec)} take {ms(ev.get('p50_ms'))} at the median but some ran "
            f"{ms(ev.get('longest_ms'))} with no deadline cutting them off. Healthy calls finish within "
            f"{ms(ev.get('p99_healthy_ms'))} (p99), so a timeout there cuts only calls that were already lost."
        ),
        "dependencies": (
            "A timed-out call may still complete on the server: writes need idempotency keys before they can be "
            "retried after a timeout. The timeout must be shorter than the caller's own deadline, or it never "
            "fires."
        ),
        "consistency": (
            "For a write, a timeout leaves the outcome unknown to the caller (it may have happened): say so in "
            "the response or reconcile later; reads are unaffected."
        ),
        "failure_handling": (
            "On timeout cancel the call (context cancellation, gRPC deadline), then serve a fallback or fail the "
            "request with a clear error; a bounded retry is allowed only inside the remaining deadline."
        ),
        "tests": (
            f"Inject a hang into {_target_names(rec)} (a delay proxy or a fake server that never answers): assert the "
            f"caller returns after about {ms(timeout)} and that the downstream work is cancelled."
        ),
    }
    return design, "timeout", {"timeout_ms": timeout, "calls": _call_ops(rec, facts)}


def concurrent_calls(rec: Rec, facts: Mapping[str, Any]) -> tuple[Design, str, dict[str, Any]]:
    """N identical calls issued concurrently (a batch-style finding): one batch call instead."""
    ev = rec.get("evidence") or {}
    n = ev.get("calls_p50") or ev.get("n_p50") or ev.get("calls")
    n_max = ev.get("calls_max") or ev.get("n_max") or n
    target = (_targets(rec) or [{}])[0]
    op = target.get("operation") or rec.get("operation") or "the call"
    service = target.get("service") or "the downstream"
    design: Design = {
        "pattern": {
            "name": "batch call (one request for the N identical concurrent calls)",
            "parameters": {"calls_per_request": n, "batch_size": n_max},
            "summary": f"Send one batched {q(op)} for up to {count(n_max)} items instead of "
            f"{count(n)} concurrent calls.",
        },
        "rationale": (
            f"{_where(rec)} sends {count(n)} identical {q(op)} calls to {service} at the same time. They already "
            "overlap, so the caller waits only for the slowest, but the downstream pays per-call overhead "
            f"{count(n)} times and the slowest of {count(n)} is a tail latency: one batched call removes both."
        ),
        "dependencies": (
            f"{service} must offer a batch form of {q(op)} (a list of ids in, a map out) before the caller can "
            "switch; the caller must map results back to items, including missing ones."
        ),
        "consistency": "Stronger: one batched read sees one snapshot where concurrent calls saw several.",
        "failure_handling": (
            "One failure now fails the whole batch: retry it as a unit (reads are idempotent) within the "
            f"caller's deadline; split batches larger than {count(n_max)} items."
        ),
        "tests": (
            f"Assert one call to {service} per request; test empty, duplicate and missing ids; load-test the "
            "batch endpoint at the largest batch size."
        ),
    }
    return (
        design,
        "batch",
        {"statement": op, "batch_size": n_max, "calls": _call_ops(rec, facts), "target": op},
    )


def generic(rec: Rec, facts: Mapping[str, Any]) -> tuple[Design, str, dict[str, Any]]:
    kind = str(rec.get("kind") or "finding").replace("_", " ")
    parallel = rec.get("category") == "parallelization"
    imp = rec.get("impact") or {}
    name = "start independent calls together (scatter-gather)" if parallel else "contain the failure"
    design: Design = {
        "pattern": {
            "name": name,
            "parameters": {},
            "summary": f"A {kind} finding: "
            + (
                "run the calls involved together where they are independent."
                if parallel
                else "add a fallback, a timeout or backoff where the evidence shows the gap."
            ),
        },
        "rationale": (
            f"{_where(rec)} shows a {kind} pattern involving {_target_names(rec)}"
            + (
                f"; the what-if saves {ms(imp.get('saved_ms_p50'))} at the root at p50."
                if imp.get("saved_ms_p50") is not None
                else "."
            )
        ),
        "dependencies": (
            "Check in the code that the calls involved do not use each other's results or side effects before "
            "changing their order or concurrency."
        ),
        "consistency": "Depends on the change: reads are unaffected by running them together; writes need care.",
        "failure_handling": "Bound the changed calls with one deadline and decide what the caller returns when one fails.",
        "tests": f"Fault-inject latency and errors into {_target_names(rec)} and load-test them after the change.",
    }
    return (
        design,
        "scatter_gather" if parallel else "generic",
        {"calls": _call_ops(rec, facts), "caller": rec.get("operation")},
    )


KINDS: dict[str, Callable[[Rec, Mapping[str, Any]], tuple[Design, str, dict[str, Any]]]] = {
    "serialized_calls": serialized_calls,
    "concurrent": concurrent_calls,
    "concurrent_calls": concurrent_calls,
    "n_plus_one": n_plus_one,
    "fanout_concurrency_limit": fanout_concurrency_limit,
    "fanout_straggler": fanout_straggler,
    "lock_contention": lock_contention,
    "retry_without_backoff": retry_without_backoff,
    "error_propagation": error_propagation,
    "missing_timeout": missing_timeout,
}

_WATCH = {
    "serialized_calls": "the calls' spans should start together",
    "concurrent": "one batched span per request instead of many concurrent ones",
    "concurrent_calls": "one batched span per request instead of many concurrent ones",
    "n_plus_one": "one span per request to the target instead of many; the target's query rate drops",
    "fanout_concurrency_limit": "the calls of one fan-out start in one wave; watch the downstream's concurrent requests and error rate",
    "fanout_straggler": "the slowest branch's duration and the hedge rate (extra calls per fan-out)",
    "lock_contention": "the lock wait spans or events shrink; the queue depth attribute stays low",
    "retry_without_backoff": "attempts per burst and the gaps between them (growing, randomised); the dependency's request rate during errors",
    "error_propagation": "the root's error rate (falls) and the rate of fallback answers (a new metric to add)",
    "missing_timeout": "no call runs past the timeout; count of timed-out calls and fallback answers",
}


def build_design(rec: Rec, facts: Mapping[str, Any]) -> dict[str, Any]:
    """The ``design`` object of one recommendation (see the module docstring)."""
    kind = str(rec.get("kind") or "")
    make = KINDS.get(kind, generic)
    design, family, code_params = make(rec, facts)
    params = design["pattern"]["parameters"]
    for key, value in list(params.items()):  # parameters for people: 30.434 ms, not 30.433818
        if isinstance(value, float):
            params[key] = round(value, 3)
    watch = _WATCH.get(kind, "the spans named in the evidence")
    design["verification"] = _verification(rec, facts, f"Also watch: {watch}.")
    design["predicted"] = {
        k: facts.get(k)
        for k in ("root_ms_p50_before", "root_ms_p95_before", "root_ms_p50_after", "root_ms_p95_after")
    }
    # the exemplar's critical path after the re-timing: the spans with the most self time on it
    design["predicted"]["critical_path_after"] = list(
        (facts.get("exemplar") or {}).get("critical_path_after") or []
    )
    design["pseudocode"] = pseudocode(family, facts.get("language"), code_params)
    ex = facts.get("exemplar") or {}
    seq = ex.get("sequence") or {}
    design["sequence"] = {
        "before": seq.get("before"),
        "after": seq.get("after"),
        "trace_id": ex.get("trace_id"),
    }
    for key in PROSE_FIELDS:
        design[key] = " ".join(str(design.get(key, "")).split())
    design["pattern"]["summary"] = " ".join(str(design["pattern"]["summary"]).split())
    return design
