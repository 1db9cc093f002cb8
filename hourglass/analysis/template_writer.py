"""The offline template writer: a title, a summary and concrete actions for each recommendation.

Always available (no network). Texts are written from the recommendation's own numbers — ms saved
at p50/p95, share of root latency, traces affected — and name the operations involved, so a reader
can act without opening the evidence. One function per kind; an unknown kind gets a plain,
number-bearing text rather than nothing.

Each text also carries the recommendation's ``design`` (:func:`hourglass.analysis.design.build_design`),
written from the facts the context offers (``design_facts``: language, exemplar sequence
diagrams, predicted root latencies); without them the design is still complete, with neutral
pseudocode and no diagrams.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hourglass.analysis.design import build_design, count, ms, pct
from hourglass.analysis.writer import WriteOutcome, WriterContext, WrittenText

Rec = dict[str, Any]


def plural(n: Any, word: str, many: str | None = None) -> str:
    count = round(float(n or 0))
    return f"{count} {word if count == 1 else (many or word + 's')}"


def code(text: Any) -> str:
    clean = str(text).replace("`", "'")
    return f"`{clean}`"


def _caller(rec: Rec) -> str:
    return f"{code(rec['operation'])} in {code(rec['service'])}"


def _targets(rec: Rec, limit: int = 4) -> str:
    names = [f"{code(t.get('operation'))} ({t.get('service')})" for t in rec.get("targets") or []]
    if len(names) > limit:
        names = [*names[:limit], f"{len(names) - limit} more"]
    if not names:
        return "its calls"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _saving(rec: Rec) -> str:
    imp = rec.get("impact") or {}
    if imp.get("saved_ms_p50") is None:
        return ""
    return (
        f"Fixing this would cut end-to-end latency by {ms(imp['saved_ms_p50'])} at the median and "
        f"{ms(imp['saved_ms_p95'])} at p95 ({pct(imp.get('share_of_root_latency'))} of the affected requests' "
        f"latency, {ms(imp.get('saved_ms_total'))} over the {plural(rec['traces_affected'], 'trace')} analysed)."
    )


def _seen(rec: Rec) -> str:
    return f"Seen in {plural(rec['traces_affected'], 'trace')} ({plural(rec['occurrences'], 'occurrence')})."


def serialized_calls(rec: Rec) -> WrittenText:
    ev = rec["evidence"]
    n = round(float(ev.get("calls_p50") or len(rec.get("targets") or []) or 2))
    if ev.get("distinct_orders", 0) > 1 or ev.get("overlapping_instances", 0) > 0:
        independence = (
            "The calls do not depend on each other: "
            + (
                f"their order varies across requests ({plural(ev.get('distinct_orders'), 'order')} seen)"
                if ev.get("distinct_orders", 0) > 1
                else f"they already overlap in {plural(ev.get('overlapping_instances'), 'request')}"
            )
            + "."
        )
    else:
        independence = (
            "Traces cannot show whether one call needs another's result; check before changing the code."
        )
    if ev.get("independence_unverified"):
        independence = (
            f"They run in the same order in every request ({plural(ev.get('caller_instances'), 'request')} seen) "
            f"and {plural(ev.get('calls_taking_input'), 'call')} take inputs, so traces cannot show whether one "
            "needs another's result: the evidence is weak, and the estimate keeps the last call after the others."
        )
    summary = (
        f"{_caller(rec)} calls {_targets(rec)} one after another, spending {ms(ev.get('serial_ms_p50'))} "
        f"on them at the median. {_saving(rec)} {independence} {_seen(rec)}"
    )
    actions = [
        f"Start the calls to {_targets(rec)} together and wait for all of them (asyncio.gather, "
        "CompletableFuture.allOf, Promise.all, errgroup), then continue with their results.",
        "If one call needs another's result, start the independent ones first and overlap them with the dependent chain.",
        "Keep the caller's own work between the calls outside the concurrent block; give the concurrent calls one shared deadline.",
    ]
    if ev.get("independence_unverified"):
        actions.insert(
            0,
            f"First check in the code of {_caller(rec)} which of these calls uses an earlier call's result "
            "(an id, a token, a list to look up); only the calls that do not can start together.",
        )
    return WrittenText(
        f"Run {n} sequential calls in {rec['operation']} concurrently", summary.strip(), actions
    )


def batchable_calls(rec: Rec) -> WrittenText:
    ev = rec["evidence"]
    target = (rec.get("targets") or [{}])[0]
    statement = str(ev.get("statement") or target.get("operation"))
    calls = ev.get("calls_p50")
    summary = (
        f"{_caller(rec)} sends {plural(calls, 'request')} to {code(statement)} ({target.get('service')}) at once, "
        f"one per item, at the median (up to {ev.get('calls_max')}): {plural(ev.get('round_trips_saved_p50'), 'round trip')} "
        f"and {ms(ev.get('server_ms_p50'))} of server time per request where one batched call would take about "
        f"{ms(ev.get('batched_ms_p50'))}; the request waits {ms(ev.get('latency_ms_p50'))} for the slowest of them. "
        f"{_saving(rec)} {_seen(rec)}"
    )
    actions = [
        f"Add a batch endpoint or bulk query for {code(statement)} (ids in one request, WHERE id IN (...)) "
        f"and call it once instead of {plural(calls, 'time')}.",
        "Until it exists, a DataLoader-style batcher in the caller can coalesce the per-item calls of one request.",
        "Keep one deadline for the batched call; a partial result per item lets one bad id fail alone.",
    ]
    short = statement if len(statement) <= 60 else statement[:57] + "..."
    return WrittenText(f"Batch the {plural(calls, 'concurrent call')} to {short}", summary.strip(), actions)


def n_plus_one(rec: Rec) -> WrittenText:
    ev = rec["evidence"]
    target = (rec.get("targets") or [{}])[0]
    statement = str(ev.get("statement") or target.get("operation"))
    calls = ev.get("calls_p50")
    different = ev.get("different_parameters")
    params = {True: ", each with different parameters", False: ", with the same parameters each time"}.get(
        different, ""
    )
    summary = (
        f"{_caller(rec)} runs {code(statement)} against {target.get('service')} {plural(calls, 'time')} per request "
        f"at the median (up to {ev.get('calls_max')}), one call after another{params}; each call takes "
        f"{ms(ev.get('call_ms_p50'))} and together they take {ms(ev.get('serial_ms_p50'))}. {_saving(rec)} {_seen(rec)}"
    )
    batch = [
        f"Fetch all rows in one query (WHERE id IN (...) or a JOIN) or one batch request instead of {plural(calls, 'call')}.",
        "With an ORM, eager-load the relation (select_related/prefetch_related, JOIN FETCH, include) "
        "or use a DataLoader that batches per request.",
        "If batching is not possible, issue the calls concurrently with a bounded pool.",
    ]
    cache = [
        f"The same call is repeated {plural(calls, 'time')} with identical parameters: call it once and reuse the result.",
        "Cache the result for the duration of the request (or longer if the data allows).",
    ]
    actions = cache if different is False else batch
    short = statement if len(statement) <= 60 else statement[:57] + "..."
    return WrittenText(
        f"Batch the {plural(calls, 'call')} to {short} in {rec['operation']}", summary.strip(), actions
    )


def lock_contention(rec: Rec) -> WrittenText:
    ev = rec["evidence"]
    resource = ev.get("resource") or (rec.get("targets") or [{}])[0].get("operation") or "a shared resource"
    wait = ev.get("wait_ms_p50")
    share = ev.get("wait_share_p50") or ev.get("wait_share")
    peers = ev.get("peers_p50")
    bits = [f"{_caller(rec)} waits {ms(wait)} at the median for {code(resource)}"]
    if share is not None:
        bits.append(f"{pct(share)} of its time")
    text = ", ".join(bits) + "."
    if peers:
        text += f" Requests queue behind about {count(peers)} concurrent peers; latency grows by {ms(ev.get('added_ms_per_peer'))} per peer."
    summary = f"{text} {_saving(rec)} {_seen(rec)}"
    actions = [
        f"Shorten the critical section that holds {code(resource)}: do reads, remote calls and computation before taking the lock.",
        "Lock at a finer grain (per row or per key instead of per table or per process) or use optimistic concurrency.",
        "If the resource is a single worker or connection, add capacity or shard the queue by key.",
    ]
    return WrittenText(f"Reduce waiting for {resource} in {rec['operation']}", summary.strip(), actions)


def fanout_straggler(rec: Rec) -> WrittenText:
    ev = rec["evidence"]
    pattern = ev.get("pattern")
    target = _targets(rec)
    summary = (
        f"{_caller(rec)} fans out to {target} across {count(ev.get('branches_p50'))} branches and waits for the slowest: "
        f"{ms(ev.get('slowest_branch_ms_p50'))} against a median branch of {ms(ev.get('median_branch_ms_p50'))}. "
    )
    if pattern == "skew":
        summary += f"The same branch ({ev.get('slow_branch')}) is the slow one in {pct(ev.get('slow_branch_share'))} of requests. "
        actions = [
            f"Rebalance or split the hot branch {code(ev.get('slow_branch'))}: move keys off it or add a replica.",
            "Check that branch's host for resource pressure (CPU, GC, disk) or a slower version.",
        ]
    elif pattern == "undetermined":
        summary += "Too few requests show it to tell a hot branch (skew) from a random tail. "
        actions = [
            "Compare the branches over more requests: rebalance a branch that is always the slow one.",
            "Give each branch a timeout and return partial results when one branch is late.",
        ]
    else:
        summary += "A different branch is the slow one each time, a random tail. "
        actions = [
            "Send a hedged request to another replica when a branch exceeds the p95 of its peers.",
            "Give each branch a timeout and return partial results when one branch is late.",
        ]
    summary += f"{_saving(rec)} {_seen(rec)}"
    return WrittenText(f"Stop {rec['operation']} waiting for its slowest branch", summary.strip(), actions)


def fanout_concurrency_limit(rec: Rec) -> WrittenText:
    ev = rec["evidence"]
    k = ev.get("k")
    if ev.get("shared_across_traces"):
        summary = (
            f"{_caller(rec)} sends its {count(ev.get('n_p50'))} calls to {_targets(rec)} through a pool that every "
            f"concurrent request shares and that runs at most {k} calls at once: "
            f"{pct(ev.get('saturation'))} of the calls found it full, so later calls queue "
            f"for {ms(ev.get('queued_ms_p50'))} at the median. {_saving(rec)} {_seen(rec)}"
        )
        actions = [
            f"Raise the shared worker or connection pool above {k}: it serves all requests at once, so "
            "size it for the peak number of concurrent requests times their fan-out.",
            "Or give each request its own bounded concurrency, so one request's fan-out does not wait "
            "behind another's.",
            "If the downstream cannot take more concurrent calls, batch the calls instead.",
        ]
        return WrittenText(
            f"Enlarge the shared {k}-worker pool behind {rec['operation']}", summary.strip(), actions
        )
    summary = (
        f"{_caller(rec)} runs its {count(ev.get('n_p50'))} calls to {_targets(rec)} at most {k} at a time, "
        f"so later calls queue for {ms(ev.get('queued_ms_p50'))} at the median. {_saving(rec)} {_seen(rec)}"
    )
    actions = [
        f"Raise the worker or connection pool limit above {k} (or remove it) for this fan-out.",
        "If the downstream cannot take more concurrent calls, batch the calls instead.",
    ]
    return WrittenText(f"Lift the {k}-at-a-time limit on {rec['operation']}", summary.strip(), actions)


def retry_without_backoff(rec: Rec) -> WrittenText:
    ev = rec["evidence"]
    summary = (
        f"{_caller(rec)} retries failed calls to {_targets(rec)} "
        f"{'after the same short wait every time' if ev.get('pattern') == 'constant_short_delay' else 'immediately'}: "
        f"{count(ev.get('attempts_per_burst_p50'))} attempts per burst at the median (up to {ev.get('attempts_per_burst_max')}), "
        f"{ms(ev.get('gap_ms_p50'))} apart. Retries without backoff hammer a struggling dependency "
        f"and turn a blip into an outage. {_seen(rec)}"
    )
    actions = [
        "Retry with exponential backoff and jitter (for example 100 ms, 200 ms, 400 ms, each randomised).",
        "Cap the attempts and add a retry budget or circuit breaker so retries stop when the dependency is down.",
        "Retry only idempotent calls and errors that can succeed on retry (timeouts, 503, UNAVAILABLE).",
    ]
    return WrittenText(f"Back off between retries of {_targets(rec, 1)}", summary.strip(), actions)


def error_propagation(rec: Rec) -> WrittenText:
    ev = rec["evidence"]
    summary = (
        f"Failures of {_targets(rec)} reach the end user through {_caller(rec)} with no fallback: "
        f"{ev.get('failed_root_requests', ev.get('requests_at_risk', 'some'))} failed requests; the dependency fails "
        f"{pct(ev.get('dependency_error_rate'))} of its calls. {_seen(rec)}"
    )
    actions = [
        f"Catch the dependency's errors in {code(rec['operation'])} and degrade: serve cached or default data, or omit the part.",
        "Add a circuit breaker so a failing dependency is skipped quickly instead of failing every request.",
        "Return a partial response with a clear status rather than an error when the data is optional.",
    ]
    return WrittenText(
        f"Contain failures of {_targets(rec, 1)} in {rec['operation']}", summary.strip(), actions
    )


def missing_timeout(rec: Rec) -> WrittenText:
    ev = rec["evidence"]
    summary = (
        f"{_caller(rec)} lets calls to {_targets(rec)} run far past their usual time: the median call takes "
        f"{ms(ev.get('p50_ms'))} but some ran {ms(ev.get('longest_ms'))}, with no deadline cutting them off. "
        f"{_saving(rec)} {_seen(rec)}"
    )
    suggested = ev.get("suggested_timeout_ms")
    actions = [
        f"Set a client timeout of about {ms(suggested)} on these calls (a little above their healthy p99)."
        if suggested
        else "Set a client timeout a little above the calls' healthy p99.",
        "Propagate the request's deadline downstream (gRPC deadlines, context cancellation) so abandoned work stops.",
        "Pair the timeout with a fallback or a bounded retry so a timed-out call does not fail the request.",
    ]
    return WrittenText(f"Add a timeout to {_targets(rec, 1)}", summary.strip(), actions)


def generic(rec: Rec) -> WrittenText:
    summary = f"{_caller(rec)}: {rec['kind'].replace('_', ' ')} involving {_targets(rec)}. {_saving(rec)} {_seen(rec)}"
    return WrittenText(
        f"{rec['kind'].replace('_', ' ').capitalize()} in {rec['operation']}",
        summary.strip(),
        ["Open an exemplar trace from the evidence and inspect the spans listed there."],
    )


TEMPLATES: dict[str, Callable[[Rec], WrittenText]] = {
    "serialized_calls": serialized_calls,
    "n_plus_one": n_plus_one,
    "batchable_calls": batchable_calls,
    "lock_contention": lock_contention,
    "fanout_straggler": fanout_straggler,
    "fanout_concurrency_limit": fanout_concurrency_limit,
    "retry_without_backoff": retry_without_backoff,
    "error_propagation": error_propagation,
    "missing_timeout": missing_timeout,
}


class TemplateWriter:
    name = "template"

    def write(self, recommendations: list[dict[str, Any]], context: WriterContext) -> WriteOutcome:
        texts = {}
        facts_of = getattr(context, "design_facts", None)
        for rec in recommendations:
            text = TEMPLATES.get(rec["kind"], generic)(rec)
            text.summary = " ".join(text.summary.split())
            facts = facts_of(rec["id"]) if callable(facts_of) else None
            text.design = build_design(rec, facts or {})
            texts[rec["id"]] = text
        return WriteOutcome(texts=texts, writer=self.name)
