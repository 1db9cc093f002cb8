"""The shortcuts the detectors' extraction takes give what the plain expressions give: a running
maximum per contiguous group (``_common.running_max``) equals ``cum_max().over(key)``; the URL
template, the SQL normalisation in two steps and the endpoint of generic HTTP calls equal the
expressions they replace, on texts chosen to hit their edges."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from hourglass.analysis.detectors import _common
from hourglass.analysis.detectors._common import (
    _ID_SEGMENT,
    _TOKEN,
    _URL_PREFIX,
    annotate_operations,
    key_changes,
    normalized_sql,
    route_template,
    running_max,
    with_span_columns,
)


@pytest.mark.parametrize("seed", range(40))
def test_running_max_is_cum_max_over_contiguous_groups(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 300))
    wide = seed % 4 == 0  # values too far apart to lift: the window's way
    frame = pl.DataFrame(
        {
            "k1": rng.integers(0, 6, n),
            "k2": pl.Series([["a", "b", None][i] for i in rng.integers(0, 3, n)], dtype=pl.String),
            "v": rng.integers(-(1 << 62) if wide else 10**18, (1 << 62) if wide else 10**18 + 10**9, n),
        }
    ).sort(["k1", "k2"], nulls_last=bool(seed % 2))
    want = frame.select(pl.col("v").cum_max().over(["k1", "k2"])).to_series()
    got = running_max(frame["v"], frame.select(key_changes(["k1", "k2"])).to_series())
    assert got.to_list() == want.to_list()
    assert got.dtype == want.dtype


def test_running_max_lifts_each_group_from_its_own_minimum(monkeypatch: pytest.MonkeyPatch) -> None:
    """30k groups over 30 days of timestamps, one call at epoch 0: the lift fits because it needs
    only each group's own spread (a lift over the partition's whole range did not fit and ran the
    window, slower than before the shortcut)."""
    rng = np.random.default_rng(7)
    groups = 30_000
    base = 1_700_000_000 * 10**9 + rng.integers(0, 30 * 86_400 * 10**9, groups)
    per = rng.integers(1, 4, groups)
    key = np.repeat(np.arange(groups), per)
    v = np.repeat(base, per) + rng.integers(0, 5 * 10**9, len(key))
    v[17] = 0
    frame = pl.DataFrame({"k": key, "v": v})
    want = frame.select(pl.col("v").cum_max().over("k")).to_series()
    first = frame.select(key_changes(["k"])).to_series()

    def no_window(*args: object, **kwargs: object) -> None:
        raise AssertionError("running_max took the window")

    with monkeypatch.context() as patched:
        patched.setattr(_common.pl, "DataFrame", no_window)
        got = running_max(frame["v"], first)
    assert got.to_list() == want.to_list()


def _template_as_written_before(url: pl.Expr) -> pl.Expr:
    path = url.str.replace_all(_URL_PREFIX, "")
    segment = pl.element()
    is_value = segment.str.contains(_ID_SEGMENT) | (
        segment.str.contains(_TOKEN) & (segment.str.count_matches(r"\d") >= 2)
    )
    templated = (
        path.str.split("/")
        .list.eval(pl.when(is_value).then(pl.lit("{id}")).otherwise(segment))
        .list.join("/")
        .str.replace(r"/+$", "")
    )
    return pl.when(templated == "").then(pl.lit("/")).otherwise(templated)


URLS = [
    None,
    "",
    "/",
    "//",
    "http://h",
    "http://h/",
    "https://h:8080/a/12/b/",
    "http://u@h/x/3f2a9c1e0b7d4a66/y?q=1#f",
    "/users/123e4567-e89b-12d3-a456-426614174000/orders/",
    "/mail/a@b.c",
    "/tok/ab12cd34ef",
    "\n",
    "/a\n/1",
]


def test_route_template_as_before() -> None:
    frame = pl.DataFrame({"u": URLS}, schema={"u": pl.String})
    rng = np.random.default_rng(7)
    alphabet = list("/aZ19@-_.~?#:{}% abcdef0123456789")
    extra = ["".join(rng.choice(alphabet, int(rng.integers(0, 24)))) for _ in range(3000)]
    frame = pl.concat([frame, pl.DataFrame({"u": extra}, schema={"u": pl.String})])
    want = frame.select(_template_as_written_before(pl.col("u"))).to_series()
    got = frame.select(route_template(pl.col("u"))).to_series()
    assert got.to_list() == want.to_list()


def test_annotated_statements_are_normalized_sql() -> None:
    statements = [
        "SELECT * FROM t WHERE id = 1",
        "SELECT * FROM t WHERE id = 2",
        "SELECT  *\n FROM t WHERE id IN (1, 2, 3)",
        "INSERT INTO t VALUES (1, 'a'), (2, 'b')",
        "UPDATE t SET x = :name WHERE y = 'it''s'",
        "select 0x1f, true, NULL",
    ]
    frame = pl.DataFrame(
        {
            "service": ["db"] * len(statements),
            "name": ["query"] * len(statements),
            "db_statement": statements,
            "http_method": [None] * len(statements),
            "http_route": [None] * len(statements),
            "http_url": [None] * len(statements),
            "rpc_method": [None] * len(statements),
            "peer": [None] * len(statements),
            "db_system": ["postgresql"] * len(statements),
        },
        schema_overrides={
            c: pl.String for c in ("http_method", "http_route", "http_url", "rpc_method", "peer")
        },
    )
    annotated = annotate_operations(frame)
    assert annotated["op_detail"].to_list() == frame.select(normalized_sql())["db_statement"].to_list()


def _spans(names: list[str], urls: list[str | None]) -> pl.DataFrame:
    n = len(names)
    return pl.DataFrame(
        {
            "row": np.arange(n, dtype=np.uint32),
            "parent_row": [None, *range(n - 1)],
            "name": names,
            "service": ["s"] * n,
            "http_route": [None] * n,
            "http_url": urls,
        },
        schema_overrides={"parent_row": pl.Int64, "http_route": pl.String, "http_url": pl.String},
    )


@pytest.mark.parametrize("given", [False, True])
def test_endpoint_only_for_generic_names(given: bool) -> None:
    spans = _spans(
        ["GET", "get user", "HTTP GET", "GET", None],
        ["http://h/shards/3/search?q=1", "http://h/users/7", "http://h/a/1", None, "http://h/x/2"],
    )
    frame = spans.select("row", "parent_row").slice(1)
    names = spans["name"].unique()  # (one set of names: two unique() calls need not agree on order)
    generic = names.filter(names.str.contains(_common._GENERIC_HTTP_NAME))
    out = with_span_columns(spans, frame, ["name", "endpoint"], generic if given else None)
    assert out["endpoint"].to_list() == ["", "/a/{}", "", ""]
    # no generic name among the rows: every endpoint is ""
    none = with_span_columns(spans, spans.select("row", "parent_row").slice(1, 1), ["endpoint"])
    assert none["endpoint"].to_list() == [""]
