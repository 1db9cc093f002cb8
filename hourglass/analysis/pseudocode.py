"""Pseudocode for a design, idiomatic for the language of the service that must change.

``pseudocode(family, language, params)`` returns ``{"language", "code"}``. ``language`` is the
service's ``telemetry.sdk.language`` (see :mod:`hourglass.analysis.resources`); when no idiomatic sketch
exists for it (or it is unknown) the sketch is neutral pseudocode and ``language`` says
``"pseudocode"``. The calls are named after the real operations (an identifier derived from the
span name, with the exact name in a comment), and the numeric parameters (pool size, deadlines,
hedge delay, timeout, backoff base) are the ones the design computed from the evidence.

Families: ``scatter_gather`` (independent calls started together under one deadline),
``batch`` (N+1 → one batched call), ``memoize`` (the same call repeated with the same
parameters), ``bounded_pool`` (a fan-out through a pool of size k), ``hedge`` (per-branch
deadline plus a hedged request), ``lock`` (short critical section / optimistic concurrency),
``retry`` (exponential backoff, jitter, budget), ``breaker`` (circuit breaker with a fallback),
``timeout`` (a deadline on a call) and ``generic``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

LANGUAGE_NAMES = {
    "go": "Go",
    "java": "Java",
    "python": "Python",
    "nodejs": "Node.js (TypeScript)",
    "dotnet": ".NET (C#)",
    "ruby": "Ruby",
    "php": "PHP",
    "rust": "Rust",
    "cpp": "C++",
    "pseudocode": "pseudocode",
}


def ident(name: Any, style: str = "camel", fallback: str = "call") -> str:
    """An identifier from an operation name: ``GET /estimates/{sku}`` → ``getEstimates`` / ``get_estimates``."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", str(name))  # GetDriver -> Get Driver
    words = [w for w in re.split(r"[^A-Za-z0-9]+", spaced) if w and not w.isdigit()]
    words = [w.lower() for w in words][:4] or [fallback]
    if words[0][0].isdigit():
        words.insert(0, fallback)
    if style == "snake":
        return "_".join(words)
    if style == "pascal":
        return "".join(w.capitalize() for w in words)
    return words[0] + "".join(w.capitalize() for w in words[1:])


def _comment(prefix: str, text: str) -> str:
    return f"{prefix} {' '.join(str(text).split())[:110]}"


def _calls(params: Mapping[str, Any], limit: int = 4) -> list[str]:
    calls = [str(c) for c in params.get("calls") or []] or ["the first call", "the second call"]
    return list(dict.fromkeys(calls))[:limit]


def _num(value: Any, symbol: str) -> str:
    """A parameter as code: its value from the evidence, or a named constant when the evidence has
    none (no invented number)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return symbol
    if v != v:
        return symbol
    return f"{v:.0f}" if v >= 10 or v.is_integer() else f"{v:.1f}"


def _secs(ms_text: str) -> str:
    """Seconds from a ``_num`` milliseconds text (an expression when it is a named constant)."""
    try:
        return f"{float(ms_text) / 1000:g}"
    except ValueError:
        return f"{ms_text} / 1000"


# --- scatter-gather ----------------------------------------------------------------------------


def _scatter_gather(lang: str, p: Mapping[str, Any]) -> str | None:
    calls = _calls(p)
    deadline = _num(p.get("deadline_ms"), "DEADLINE_MS")
    caller = str(p.get("caller") or "handler")
    if lang == "go":
        lines = [
            _comment("//", f"{caller}: start the independent calls together, one shared deadline"),
            f"ctx, cancel := context.WithTimeout(ctx, {deadline}*time.Millisecond)",
            "defer cancel()",
            "g, ctx := errgroup.WithContext(ctx)",
        ]
        for c in calls:
            v = ident(c)
            lines += [
                f"var {v} Result",
                _comment("//", c),
                f"g.Go(func() (err error) {{ {v}, err = {v}Call(ctx); return err }})",
            ]
        lines += [
            "if err := g.Wait(); err != nil {",
            "    return partialOrError(err) // one failed: the others are cancelled",
            "}",
        ]
        return "\n".join(lines)
    if lang == "java":
        lines = [_comment("//", f"{caller}: start the independent calls together, one shared deadline")]
        for c in calls:
            v = ident(c)
            lines += [
                _comment("//", c),
                f"var {v} = CompletableFuture.supplyAsync(() -> client.{v}(req), executor);",
            ]
        names = ", ".join(ident(c) for c in calls)
        lines += [
            f"CompletableFuture.allOf({names})",
            f"    .orTimeout({deadline}, TimeUnit.MILLISECONDS)",
            "    .join(); // a failure or the deadline completes exceptionally: cancel the rest",
        ]
        return "\n".join(lines)
    if lang == "python":
        lines = [_comment("#", f"{caller}: start the independent calls together, one shared deadline")]
        lines += [
            f"async with asyncio.timeout({_secs(deadline)}):",
            "    async with asyncio.TaskGroup() as tg:",
        ]
        for c in calls:
            v = ident(c, "snake")
            lines += [f"        {_comment('#', c)}", f"        {v} = tg.create_task(client.{v}(req))"]
        lines += ["# a failing task cancels its siblings and raises an ExceptionGroup"]
        return "\n".join(lines)
    if lang == "nodejs":
        names = ", ".join(ident(c) for c in calls)
        lines = [
            _comment("//", f"{caller}: start the independent calls together, one shared deadline"),
            f"const signal = AbortSignal.timeout({deadline});",
            f"const [{names}] = await Promise.all([",
        ]
        lines += [f"  client.{ident(c)}(req, {{ signal }}), {_comment('//', c)}" for c in calls]
        lines += ["]); // rejects on the first failure; use Promise.allSettled to keep partial results"]
        return "\n".join(lines)
    if lang == "dotnet":
        lines = [
            _comment("//", f"{caller}: start the independent calls together, one shared deadline"),
            "using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);",
            f"cts.CancelAfter(TimeSpan.FromMilliseconds({deadline}));",
        ]
        for c in calls:
            v = ident(c)
            lines += [_comment("//", c), f"var {v} = client.{ident(c, 'pascal')}Async(req, cts.Token);"]
        lines += [f"await Task.WhenAll({', '.join(ident(c) for c in calls)});"]
        return "\n".join(lines)
    if lang == "ruby":
        lines = [_comment("#", f"{caller}: start the independent calls together, one shared deadline")]
        lines += [f"Timeout.timeout({_secs(deadline)}) do", "  Async do |task|"]
        for c in calls:
            v = ident(c, "snake")
            lines += [f"    {_comment('#', c)}", f"    {v} = task.async {{ client.{v}(req) }}"]
        lines += [
            f"    results = [{', '.join(ident(c, 'snake') for c in calls)}].map(&:wait)",
            "  end",
            "end",
        ]
        return "\n".join(lines)
    if lang == "php":
        lines = [
            _comment("//", f"{caller}: start the independent calls together, one shared deadline (Guzzle)")
        ]
        lines += ["$promises = ["]
        lines += [
            f"    '{ident(c)}' => $client->getAsync('{c}', ['timeout' => {_secs(deadline)}])," for c in calls
        ]
        lines += ["];", "$results = GuzzleHttp\\Promise\\Utils::settle($promises)->wait();"]
        return "\n".join(lines)
    if lang == "rust":
        names = ", ".join(ident(c, "snake") for c in calls)
        lines = [
            _comment("//", f"{caller}: start the independent calls together, one shared deadline"),
            f"let ({names}) = tokio::time::timeout(",
            f"    Duration::from_millis({deadline}),",
            "    async { tokio::try_join!(",
        ]
        lines += [f"        client.{ident(c, 'snake')}(&req), {_comment('//', c)}" for c in calls]
        lines += ["    ) },", ").await??;"]
        return "\n".join(lines)
    if lang == "cpp":
        lines = [_comment("//", f"{caller}: start the independent calls together, one shared deadline")]
        for c in calls:
            v = ident(c)
            lines += [
                _comment("//", c),
                f"auto {v} = std::async(std::launch::async, [&] {{ return client.{v}(req); }});",
            ]
        lines += [
            f"auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds({deadline});"
        ]
        lines += [
            f"if ({ident(c)}.wait_until(deadline) != std::future_status::ready) cancel(req);" for c in calls
        ]
        return "\n".join(lines)
    return None


# --- batch / memoize ---------------------------------------------------------------------------


_SQL = re.compile(r"^\s*(select|with|update|delete|insert)\b", re.I)


def _batch_call(lang: str, p: Mapping[str, Any]) -> str | None:
    """N+1 over an RPC, HTTP or key-value call (not SQL): one batch call for all ids."""
    call = str(p.get("statement") or (p.get("calls") or ["the repeated call"])[0])
    size = _num(p.get("batch_size"), "MAX_BATCH")
    batch = ident(call) + "Batch"
    head = f"before: one {call} per id; after: one batch call (a batch endpoint, MGET, a list RPC) for up to {size} ids"
    if lang == "go":
        return "\n".join(
            [
                _comment("//", head),
                f"byID, err := client.{batch}(ctx, ids) // map[id]Item, missing ids absent",
                "if err != nil { return err }",
            ]
        )
    if lang == "java":
        return "\n".join(
            [_comment("//", head), f"Map<String, Item> byId = client.{batch}(ids); // missing ids absent"]
        )
    if lang == "python":
        return "\n".join(
            [
                _comment("#", head),
                f"by_id = await client.{ident(call, 'snake')}_batch(ids)  # missing ids absent",
            ]
        )
    if lang == "nodejs":
        return "\n".join(
            [
                _comment("//", head),
                f"const loader = new DataLoader((ids) => client.{batch}(ids), {{ maxBatchSize: {size} }});",
                "const items = await Promise.all(ids.map((id) => loader.load(id)));",
            ]
        )
    if lang == "dotnet":
        return "\n".join(
            [
                _comment("//", head),
                f"var byId = await client.{ident(call, 'pascal')}BatchAsync(ids, ct); // missing ids absent",
            ]
        )
    return None


def _batch(lang: str, p: Mapping[str, Any]) -> str | None:
    stmt = str(p.get("statement") or (p.get("calls") or ["the repeated call"])[0])
    if not _SQL.match(stmt):
        return _batch_call(lang, p)
    size = _num(p.get("batch_size"), "MAX_BATCH")
    item = ident(p.get("target") or stmt, "camel", "item")
    if lang == "go":
        return "\n".join(
            [
                _comment("// before: one query per id:", stmt),
                f"// after: one query for up to {size} ids",
                "rows, err := db.QueryContext(ctx, `... WHERE id = ANY($1)`, pq.Array(ids))",
                "byID := map[int64]Row{}",
                "for rows.Next() { var r Row; rows.Scan(&r.ID, ...); byID[r.ID] = r }",
            ]
        )
    if lang == "java":
        return "\n".join(
            [
                _comment("// before: one query per id:", stmt),
                f"// after: one query (or @BatchSize({size}) / JOIN FETCH on the relation)",
                'List<Row> rows = jdbc.query("... WHERE id IN (:ids)", Map.of("ids", ids), mapper);',
                "Map<Long, Row> byId = rows.stream().collect(toMap(Row::id, r -> r));",
            ]
        )
    if lang == "python":
        return "\n".join(
            [
                _comment("# before: one query per id:", stmt),
                f"# after: one query for up to {size} ids (or selectinload / prefetch_related on the relation)",
                'rows = await db.fetch("... WHERE id = ANY($1)", ids)',
                'by_id = {row["id"]: row for row in rows}',
            ]
        )
    if lang == "nodejs":
        return "\n".join(
            [
                _comment("// before: one query per id:", stmt),
                f"// after: a DataLoader batches the ids of one request (at most {size} per batch)",
                f"const {item}Loader = new DataLoader(async (ids) => {{",
                "  const rows = await db.query('... WHERE id = ANY($1)', [ids]);",
                "  const byId = new Map(rows.map((r) => [r.id, r]));",
                "  return ids.map((id) => byId.get(id) ?? null);",
                f"}}, {{ maxBatchSize: {size} }});",
            ]
        )
    if lang == "dotnet":
        return "\n".join(
            [
                _comment("// before: one query per id:", stmt),
                "// after: one query (EF Core: .Include(...) or Where(ids.Contains))",
                "var rows = await db.Items.Where(r => ids.Contains(r.Id)).ToListAsync(ct);",
                "var byId = rows.ToDictionary(r => r.Id);",
            ]
        )
    if lang == "ruby":
        return "\n".join(
            [
                _comment("# before: one query per id:", stmt),
                "# after: eager-load the association (one query)",
                "records = Model.where(id: ids).includes(:association).index_by(&:id)",
            ]
        )
    if lang == "php":
        return "\n".join(
            [
                _comment("// before: one query per id:", stmt),
                "// after: eager-load (Eloquent) or one WHERE IN",
                "$rows = Model::with('relation')->whereIn('id', $ids)->get()->keyBy('id');",
            ]
        )
    if lang == "rust":
        return "\n".join(
            [
                _comment("// before: one query per id:", stmt),
                'let rows = sqlx::query_as::<_, Row>("... WHERE id = ANY($1)").bind(&ids).fetch_all(&pool).await?;',
                "let by_id: HashMap<i64, Row> = rows.into_iter().map(|r| (r.id, r)).collect();",
            ]
        )
    if lang == "cpp":
        return "\n".join(
            [
                _comment("// before: one query per id:", stmt),
                'auto rows = db.query("... WHERE id IN (" + placeholders(ids.size()) + ")", ids);',
                "std::unordered_map<int64_t, Row> by_id; for (auto& r : rows) by_id.emplace(r.id, r);",
            ]
        )
    return None


def _memoize(lang: str, p: Mapping[str, Any]) -> str | None:
    call = str((p.get("calls") or ["the repeated call"])[0])
    if lang == "go":
        return "\n".join(
            [
                _comment("//", f"{call}: same parameters every time, call once per request"),
                "v, err, _ := group.Do(key, func() (any, error) { return fetch(ctx, key) }) // singleflight",
            ]
        )
    if lang == "java":
        return "\n".join(
            [
                _comment("//", f"{call}: same parameters every time, call once per request"),
                "var value = requestCache.computeIfAbsent(key, k -> client.fetch(k));",
            ]
        )
    if lang == "python":
        return "\n".join(
            [
                _comment("#", f"{call}: same parameters every time, call once per request"),
                "value = request_cache.get(key) or request_cache.setdefault(key, await client.fetch(key))",
            ]
        )
    if lang == "nodejs":
        return "\n".join(
            [
                _comment("//", f"{call}: same parameters every time, call once per request"),
                "if (!cache.has(key)) cache.set(key, client.fetch(key)); // share the promise",
                "const value = await cache.get(key);",
            ]
        )
    if lang == "dotnet":
        return "\n".join(
            [
                _comment("//", f"{call}: same parameters every time, call once per request"),
                "var value = await cache.GetOrCreateAsync(key, _ => client.FetchAsync(key, ct));",
            ]
        )
    return None


# --- pools, hedging ----------------------------------------------------------------------------


def _bounded_pool(lang: str, p: Mapping[str, Any]) -> str | None:
    k = _num(p.get("k"), "POOL_SIZE")
    call = str((p.get("calls") or ["the fan-out call"])[0])
    v = ident(call)
    if lang == "go":
        return "\n".join(
            [
                _comment("//", f"{call}: at most {k} in flight for this fan-out"),
                "g, ctx := errgroup.WithContext(ctx)",
                f"g.SetLimit({k})",
                f"for _, item := range items {{ item := item; g.Go(func() error {{ return {v}(ctx, item) }}) }}",
                "return g.Wait()",
            ]
        )
    if lang == "java":
        return "\n".join(
            [
                _comment("//", f"{call}: at most {k} in flight for this fan-out"),
                f"var limit = new Semaphore({k});",
                "try (var scope = Executors.newVirtualThreadPerTaskExecutor()) {",
                f"  var futures = items.stream().map(i -> scope.submit(() -> {{ limit.acquire(); try {{ return client.{v}(i); }} finally {{ limit.release(); }} }})).toList();",
                "}",
            ]
        )
    if lang == "python":
        return "\n".join(
            [
                _comment("#", f"{call}: at most {k} in flight for this fan-out"),
                f"limit = asyncio.Semaphore({k})",
                "async def one(item):",
                "    async with limit:",
                f"        return await client.{ident(call, 'snake')}(item)",
                "async with asyncio.TaskGroup() as tg:",
                "    tasks = [tg.create_task(one(item)) for item in items]",
            ]
        )
    if lang == "nodejs":
        return "\n".join(
            [
                _comment("//", f"{call}: at most {k} in flight for this fan-out"),
                f"const limit = pLimit({k});",
                f"const results = await Promise.all(items.map((item) => limit(() => client.{v}(item))));",
            ]
        )
    if lang == "dotnet":
        return "\n".join(
            [
                _comment("//", f"{call}: at most {k} in flight for this fan-out"),
                f"await Parallel.ForEachAsync(items, new ParallelOptions {{ MaxDegreeOfParallelism = {k}, CancellationToken = ct }},",
                f"    async (item, token) => await client.{ident(call, 'pascal')}Async(item, token));",
            ]
        )
    if lang == "rust":
        return "\n".join(
            [
                _comment("//", f"{call}: at most {k} in flight for this fan-out"),
                f"let results: Vec<_> = stream::iter(items).map(|i| client.{ident(call, 'snake')}(i)).buffer_unordered({k}).collect().await;",
            ]
        )
    return None


def _hedge(lang: str, p: Mapping[str, Any]) -> str | None:
    hedge = _num(p.get("hedge_after_ms"), "HEDGE_AFTER_MS")
    deadline = _num(p.get("deadline_ms"), "DEADLINE_MS")
    call = str((p.get("calls") or ["the branch call"])[0])
    v = ident(call)
    if lang == "go":
        return "\n".join(
            [
                _comment("//", f"{call}: hedge a slow branch after {hedge} ms, give up at {deadline} ms"),
                f"ctx, cancel := context.WithTimeout(ctx, {deadline}*time.Millisecond)",
                "defer cancel()",
                "res := make(chan Result, 2)",
                f"go func() {{ res <- {v}(ctx, primary) }}()",
                "select {",
                "case r := <-res: return r",
                f"case <-time.After({hedge} * time.Millisecond):",
                f"    go func() {{ res <- {v}(ctx, replica) }}() // first answer wins, cancel() stops the other",
                "    return <-res",
                "}",
            ]
        )
    if lang == "java":
        return "\n".join(
            [
                _comment("//", f"{call}: hedge a slow branch after {hedge} ms, give up at {deadline} ms"),
                f"var primary = CompletableFuture.supplyAsync(() -> client.{v}(shard), pool);",
                f"var hedged = CompletableFuture.supplyAsync(() -> client.{v}(replicaOf(shard)),",
                f"    CompletableFuture.delayedExecutor({hedge}, TimeUnit.MILLISECONDS, pool));",
                f"return primary.applyToEither(hedged, r -> r).orTimeout({deadline}, TimeUnit.MILLISECONDS);",
            ]
        )
    if lang == "python":
        return "\n".join(
            [
                _comment("#", f"{call}: hedge a slow branch after {hedge} ms, give up at {deadline} ms"),
                f"async with asyncio.timeout({_secs(deadline)}):",
                f"    first = asyncio.create_task(client.{ident(call, 'snake')}(shard))",
                f"    done, _ = await asyncio.wait({{first}}, timeout={_secs(hedge)})",
                "    if not done:",
                f"        second = asyncio.create_task(client.{ident(call, 'snake')}(replica_of(shard)))",
                "        done, pending = await asyncio.wait({first, second}, return_when=asyncio.FIRST_COMPLETED)",
                "        for task in pending: task.cancel()",
                "    return done.pop().result()",
            ]
        )
    if lang == "nodejs":
        return "\n".join(
            [
                _comment("//", f"{call}: hedge a slow branch after {hedge} ms, give up at {deadline} ms"),
                f"const signal = AbortSignal.timeout({deadline});",
                f"const primary = client.{v}(shard, {{ signal }});",
                f"const hedge = delay({hedge}).then(() => client.{v}(replicaOf(shard), {{ signal }}));",
                "return Promise.any([primary, hedge]);",
            ]
        )
    if lang == "dotnet":
        return "\n".join(
            [
                _comment("//", f"{call}: hedge a slow branch after {hedge} ms, give up at {deadline} ms"),
                "// Microsoft.Extensions.Http.Resilience: AddStandardHedgingHandler",
                "builder.AddStandardHedgingHandler(o => {",
                f"    o.Hedging.Delay = TimeSpan.FromMilliseconds({hedge});",
                f"    o.TotalRequestTimeout.Timeout = TimeSpan.FromMilliseconds({deadline});",
                "});",
            ]
        )
    return None


def _partial(lang: str, p: Mapping[str, Any]) -> str | None:
    """Per-branch deadline, partial results (a skewed fan-out: no hedging onto the hot branch)."""
    deadline = _num(p.get("deadline_ms"), "BRANCH_DEADLINE_MS")
    call = str((p.get("calls") or ["the branch call"])[0])
    v = ident(call)
    head = f"{call}: each branch bounded at {deadline} ms; late branches reported missing (no hedge: the slow branch is a hot shard)"
    if lang == "go":
        return "\n".join(
            [
                _comment("//", head),
                "results := make([]Result, len(shards))",
                "var wg sync.WaitGroup",
                "for i, shard := range shards {",
                "    wg.Add(1)",
                "    go func(i int, shard Shard) {",
                "        defer wg.Done()",
                f"        ctx, cancel := context.WithTimeout(ctx, {deadline}*time.Millisecond)",
                "        defer cancel()",
                f"        results[i], _ = {v}(ctx, shard) // a zero Result marks the branch missing",
                "    }(i, shard)",
                "}",
                "wg.Wait()",
            ]
        )
    if lang == "java":
        return "\n".join(
            [
                _comment("//", head),
                "var futures = shards.stream().map(s -> CompletableFuture",
                f"    .supplyAsync(() -> client.{v}(s), pool)",
                f"    .completeOnTimeout(Result.missing(s), {deadline}, TimeUnit.MILLISECONDS)).toList();",
                "var results = futures.stream().map(CompletableFuture::join).toList();",
            ]
        )
    if lang == "python":
        return "\n".join(
            [
                _comment("#", head),
                "async def branch(shard):",
                "    try:",
                f"        async with asyncio.timeout({_secs(deadline)}):",
                f"            return await client.{ident(call, 'snake')}(shard)",
                "    except TimeoutError:",
                "        return Missing(shard)",
                "results = await asyncio.gather(*(branch(s) for s in shards))",
            ]
        )
    if lang == "nodejs":
        return "\n".join(
            [
                _comment("//", head),
                "const results = await Promise.allSettled(",
                f"  shards.map((s) => client.{v}(s, {{ signal: AbortSignal.timeout({deadline}) }})),",
                "); // rejected entries are the missing branches",
            ]
        )
    if lang == "dotnet":
        return "\n".join(
            [
                _comment("//", head),
                "var tasks = shards.Select(async s => {",
                "    using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);",
                f"    cts.CancelAfter(TimeSpan.FromMilliseconds({deadline}));",
                f"    try {{ return await client.{ident(call, 'pascal')}Async(s, cts.Token); }}",
                "    catch (OperationCanceledException) { return Result.Missing(s); }",
                "});",
                "var results = await Task.WhenAll(tasks);",
            ]
        )
    return None


# --- lock ------------------------------------------------------------------------------------


def _lock(lang: str, p: Mapping[str, Any]) -> str | None:
    resource = str(p.get("resource") or "the shared resource")
    if lang == "go":
        return "\n".join(
            [
                _comment("//", f"{resource}: prepare outside the lock, hold it only for the write"),
                "entry := prepare(ctx, req) // reads, remote calls, computation",
                "mu.Lock()",
                "err := apply(entry)      // the critical section: the write only",
                "mu.Unlock()",
            ]
        )
    if lang == "java":
        return "\n".join(
            [
                _comment("//", f"{resource}: prepare outside the lock, or optimistic concurrency"),
                "var entry = prepare(req);",
                'int updated = jdbc.update("UPDATE t SET ..., version = version + 1 WHERE id = ? AND version = ?", id, version);',
                "if (updated == 0) retryWithFreshRead(); // lost the race: re-read and re-apply",
            ]
        )
    if lang == "python":
        return "\n".join(
            [
                _comment("#", f"{resource}: prepare outside the lock, hold it only for the write"),
                "entry = await prepare(req)  # reads, remote calls, computation",
                "async with lock_for(key):   # one lock per key, not one for everything",
                "    await apply(entry)",
            ]
        )
    if lang == "nodejs":
        return "\n".join(
            [
                _comment("//", f"{resource}: prepare outside the lock, hold it only for the write"),
                "const entry = await prepare(req);",
                "await mutexFor(key).runExclusive(() => apply(entry));",
            ]
        )
    if lang == "dotnet":
        return "\n".join(
            [
                _comment("//", f"{resource}: prepare outside the lock, hold it only for the write"),
                "var entry = await PrepareAsync(req, ct);",
                "await gate.WaitAsync(ct);",
                "try { await ApplyAsync(entry, ct); } finally { gate.Release(); }",
            ]
        )
    return None


# --- fault tolerance ---------------------------------------------------------------------------


def _retry(lang: str, p: Mapping[str, Any]) -> str | None:
    base = _num(p.get("base_ms"), "BASE_DELAY_MS")
    attempts = _num(p.get("attempts"), "MAX_ATTEMPTS")
    call = str((p.get("calls") or ["the call"])[0])
    v = ident(call)
    if lang == "go":
        return "\n".join(
            [
                _comment(
                    "//",
                    f"{call}: backoff from {base} ms, full jitter, at most {attempts} attempts, a budget",
                ),
                f"for attempt := 0; attempt < {attempts}; attempt++ {{",
                f"    if err = {v}(ctx); err == nil || !retryable(err) || !budget.Withdraw() {{ break }}",
                f"    sleep := time.Duration(rand.Int63n(int64({base}*time.Millisecond) << attempt))",
                "    select { case <-time.After(sleep): case <-ctx.Done(): return ctx.Err() }",
                "}",
            ]
        )
    if lang == "java":
        return "\n".join(
            [
                _comment(
                    "//",
                    f"{call}: backoff from {base} ms, jitter, at most {attempts} attempts (Resilience4j)",
                ),
                'var retry = Retry.of("' + call.replace('"', "'") + '", RetryConfig.custom()',
                f"    .maxAttempts({attempts})",
                f"    .intervalFunction(IntervalFunction.ofExponentialRandomBackoff({base}, 2))",
                "    .retryOnException(e -> isRetryable(e)).build());",
                f"var result = retry.executeSupplier(() -> client.{v}(req));",
            ]
        )
    if lang == "python":
        return "\n".join(
            [
                _comment("#", f"{call}: backoff from {base} ms, full jitter, at most {attempts} attempts"),
                f"@retry(stop=stop_after_attempt({attempts}), wait=wait_random_exponential(multiplier={_secs(base)}),",
                "       retry=retry_if_exception(is_retryable))  # tenacity",
                f"async def {ident(call, 'snake')}(req): ...",
            ]
        )
    if lang == "nodejs":
        return "\n".join(
            [
                _comment("//", f"{call}: backoff from {base} ms, jitter, at most {attempts} attempts"),
                f"for (let attempt = 0; attempt < {attempts}; attempt++) {{",
                f"  try {{ return await client.{v}(req); }} catch (err) {{",
                "    if (!isRetryable(err) || !budget.withdraw()) throw err;",
                f"    await delay(Math.random() * {base} * 2 ** attempt);",
                "  }",
                "}",
            ]
        )
    if lang == "dotnet":
        return "\n".join(
            [
                _comment(
                    "//", f"{call}: backoff from {base} ms, jitter, at most {attempts} attempts (Polly)"
                ),
                "pipeline.AddRetry(new RetryStrategyOptions {",
                f"    MaxRetryAttempts = {attempts}, Delay = TimeSpan.FromMilliseconds({base}),",
                "    BackoffType = DelayBackoffType.Exponential, UseJitter = true,",
                "});",
            ]
        )
    if lang == "ruby":
        return "\n".join(
            [
                _comment("#", f"{call}: backoff from {base} ms, jitter, at most {attempts} attempts"),
                f"Retriable.retriable(tries: {attempts}, base_interval: {_secs(base)}) {{ client.{ident(call, 'snake')}(req) }}",
            ]
        )
    if lang == "rust":
        return "\n".join(
            [
                _comment("//", f"{call}: backoff from {base} ms, jitter, at most {attempts} attempts"),
                f"let policy = ExponentialBuilder::default().with_min_delay(Duration::from_millis({base})).with_max_times({attempts}).with_jitter();",
                f"let result = (|| client.{ident(call, 'snake')}(&req)).retry(policy).when(is_retryable).await?;",
            ]
        )
    return None


def _breaker(lang: str, p: Mapping[str, Any]) -> str | None:
    call = str((p.get("calls") or ["the dependency"])[0])
    v = ident(call)
    if lang == "go":
        return "\n".join(
            [
                _comment("//", f"{call}: a circuit breaker and a fallback (sony/gobreaker)"),
                f"out, err := breaker.Execute(func() (any, error) {{ return {v}(ctx, req) }})",
                "if err != nil { return fallback(req), nil // cached or default data, flagged as partial }",
            ]
        )
    if lang == "java":
        return "\n".join(
            [
                _comment("//", f"{call}: a circuit breaker and a fallback (Resilience4j)"),
                f"var guarded = CircuitBreaker.decorateSupplier(breaker, () -> client.{v}(req));",
                "return Try.ofSupplier(guarded).recover(e -> fallback(req)).get();",
            ]
        )
    if lang == "python":
        return "\n".join(
            [
                _comment("#", f"{call}: a circuit breaker and a fallback (aiobreaker / pybreaker)"),
                "try:",
                f"    result = await breaker.call_async(client.{ident(call, 'snake')}, req)",
                "except (CircuitBreakerError, DependencyError):",
                "    result = fallback(req)  # cached or default data, flagged as partial",
            ]
        )
    if lang == "nodejs":
        return "\n".join(
            [
                _comment("//", f"{call}: a circuit breaker and a fallback (opossum)"),
                f"const breaker = new CircuitBreaker((req) => client.{v}(req));",
                "breaker.fallback((req) => cachedOrDefault(req));",
                "const result = await breaker.fire(req);",
            ]
        )
    if lang == "dotnet":
        return "\n".join(
            [
                _comment("//", f"{call}: a circuit breaker and a fallback (Polly)"),
                "pipeline.AddFallback(new FallbackStrategyOptions<Reply> { FallbackAction = _ => Outcome.FromResultAsValueTask(CachedOrDefault()) })",
                "        .AddCircuitBreaker(new CircuitBreakerStrategyOptions<Reply>());",
            ]
        )
    return None


def _timeout(lang: str, p: Mapping[str, Any]) -> str | None:
    t = _num(p.get("timeout_ms"), "TIMEOUT_MS")
    call = str((p.get("calls") or ["the call"])[0])
    v = ident(call)
    if lang == "go":
        return "\n".join(
            [
                _comment("//", f"{call}: a deadline at the healthy p99 ({t} ms), propagated downstream"),
                f"ctx, cancel := context.WithTimeout(ctx, {t}*time.Millisecond)",
                "defer cancel()",
                f"res, err := {v}(ctx, req)",
                "if errors.Is(err, context.DeadlineExceeded) { return fallback(req) }",
            ]
        )
    if lang == "java":
        return "\n".join(
            [
                _comment("//", f"{call}: a deadline at the healthy p99 ({t} ms)"),
                f"var request = HttpRequest.newBuilder(uri).timeout(Duration.ofMillis({t})).build();",
                f"// gRPC: stub.withDeadlineAfter({t}, TimeUnit.MILLISECONDS).{v}(req)",
            ]
        )
    if lang == "python":
        return "\n".join(
            [
                _comment("#", f"{call}: a deadline at the healthy p99 ({t} ms)"),
                "try:",
                f"    async with asyncio.timeout({_secs(t)}):",
                f"        result = await client.{ident(call, 'snake')}(req)",
                "except TimeoutError:",
                "    result = fallback(req)",
            ]
        )
    if lang == "nodejs":
        return "\n".join(
            [
                _comment("//", f"{call}: a deadline at the healthy p99 ({t} ms)"),
                f"const result = await client.{v}(req, {{ signal: AbortSignal.timeout({t}) }});",
            ]
        )
    if lang == "dotnet":
        return "\n".join(
            [
                _comment("//", f"{call}: a deadline at the healthy p99 ({t} ms)"),
                "using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);",
                f"cts.CancelAfter(TimeSpan.FromMilliseconds({t}));",
                f"var result = await client.{ident(call, 'pascal')}Async(req, cts.Token);",
            ]
        )
    if lang == "ruby":
        return "\n".join(
            [
                _comment("#", f"{call}: a deadline at the healthy p99 ({t} ms)"),
                f"http = Net::HTTP.new(host, port); http.read_timeout = {_secs(t)}; http.open_timeout = {_secs(t)}",
            ]
        )
    if lang == "php":
        return "\n".join(
            [
                _comment("//", f"{call}: a deadline at the healthy p99 ({t} ms)"),
                f"$response = $client->request('GET', $uri, ['timeout' => {_secs(t)}]);",
            ]
        )
    if lang == "rust":
        return "\n".join(
            [
                _comment("//", f"{call}: a deadline at the healthy p99 ({t} ms)"),
                f"let result = tokio::time::timeout(Duration::from_millis({t}), client.{ident(call, 'snake')}(&req)).await;",
            ]
        )
    if lang == "cpp":
        return "\n".join(
            [
                _comment("//", f"{call}: a deadline at the healthy p99 ({t} ms)"),
                f"context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds({t})); // gRPC",
            ]
        )
    return None


# --- neutral ---------------------------------------------------------------------------------

_NEUTRAL: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "scatter_gather": lambda p: "\n".join(
        [f"deadline = now + {_num(p.get('deadline_ms'), 'DEADLINE_MS')} ms"]
        + [f"start {c}" for c in _calls(p)]
        + [
            "wait for all (until deadline)",
            "if one failed or the deadline passed: cancel the others; return partial or error",
        ]
    ),
    "batch": lambda p: "\n".join(
        [
            f"-- before: for each id: {p.get('statement') or (p.get('calls') or ['call'])[0]}",
            f"ids = collect ids (at most {_num(p.get('batch_size'), 'MAX_BATCH')} per batch)",
            "rows = ONE query/request for all ids (WHERE id IN (...) / batch endpoint)",
            "look each id up in rows",
        ]
    ),
    "memoize": lambda p: "value = request_cache.get_or_compute(key, call once)",
    "bounded_pool": lambda p: "\n".join(
        [
            f"pool = bounded pool of {_num(p.get('k'), 'POOL_SIZE')} workers for this fan-out",
            "submit every item; wait for all; cancel the rest on a failure",
        ]
    ),
    "hedge": lambda p: "\n".join(
        [
            f"start branch call with a deadline of {_num(p.get('deadline_ms'), 'DEADLINE_MS')} ms",
            f"if no answer after {_num(p.get('hedge_after_ms'), 'HEDGE_AFTER_MS')} ms: send the same call to another replica",
            "take the first answer, cancel the other; past the deadline: return partial results",
        ]
    ),
    "partial": lambda p: "\n".join(
        [
            f"for each branch, in parallel: call with a deadline of {_num(p.get('deadline_ms'), 'BRANCH_DEADLINE_MS')} ms",
            "a branch past its deadline is reported missing (partial result); no hedge onto the hot branch",
            "rebalance: move keys off the slow branch",
        ]
    ),
    "lock": lambda p: "\n".join(
        [
            "prepare outside the lock (reads, remote calls, computation)",
            f"lock {p.get('resource') or 'resource'} per key; apply the write; unlock",
            "or: UPDATE ... WHERE version = v (optimistic); on conflict re-read and retry",
        ]
    ),
    "retry": lambda p: "\n".join(
        [
            f"for attempt in 1..{_num(p.get('attempts'), 'MAX_ATTEMPTS')}:",
            "    result = call(); if ok or not retryable or budget empty: stop",
            f"    sleep random(0, {_num(p.get('base_ms'), 'BASE_DELAY_MS')} ms * 2^attempt)",
        ]
    ),
    "breaker": lambda p: "\n".join(
        [
            "if breaker open: return fallback",
            "try call; on failure: record in breaker; return fallback (cached/default, marked partial)",
        ]
    ),
    "timeout": lambda p: "\n".join(
        [
            f"call with deadline {_num(p.get('timeout_ms'), 'TIMEOUT_MS')} ms (propagate it downstream)",
            "on timeout: cancel, return fallback or a clear error",
        ]
    ),
    "generic": lambda p: "open the exemplar trace; change the spans named in the evidence",
}

_FAMILIES: dict[str, Callable[[str, Mapping[str, Any]], str | None]] = {
    "scatter_gather": _scatter_gather,
    "batch": _batch,
    "memoize": _memoize,
    "bounded_pool": _bounded_pool,
    "hedge": _hedge,
    "partial": _partial,
    "lock": _lock,
    "retry": _retry,
    "breaker": _breaker,
    "timeout": _timeout,
}


def pseudocode(family: str, language: str | None, params: Mapping[str, Any]) -> dict[str, str]:
    """``{"language", "code"}`` for a pattern family in the service's language (see the module docstring)."""
    lang = (language or "").lower()
    make = _FAMILIES.get(family)
    code = make(lang, params) if make is not None and lang else None
    if code is not None:
        return {"language": lang, "code": code}
    neutral = _NEUTRAL.get(family, _NEUTRAL["generic"])(params)
    if lang:
        neutral = (
            f"# no {LANGUAGE_NAMES.get(lang, lang)} sketch for this pattern: neutral pseudocode\n" + neutral
        )
    return {"language": "pseudocode", "code": neutral}
