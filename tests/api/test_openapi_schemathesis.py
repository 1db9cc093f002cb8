"""schemathesis against the live server's OpenAPI schema: no input makes it answer 5xx.

Generated requests (bounded: a few dozen examples per operation, no shrinking) go to a real
`hourglass serve` over HTTP, with and without the bearer token; every response must be below 500
and conform to the documented schema where it says it is JSON.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.api.live_server import LiveServer, analysed_server

TOKEN = "schema-token"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with analysed_server(tmp_path_factory.mktemp("schemathesis"), token=TOKEN, checkout=10, home=5) as srv:
        yield srv


@pytest.fixture(scope="module")
def schema(server: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")


def test_no_server_errors(server: LiveServer, schema: schemathesis.BaseSchema) -> None:
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert {op.path for op in operations} >= {
        "/healthz",
        "/v1/recommendations",
        "/v1/recommendations/{recommendation_id}",
        "/v1/traces/{trace_id}",
        "/v1/services",
        "/v1/stats",
        "/v1/analyses",
    }
    failures: list[str] = []
    checked = 0
    statuses: set[int] = set()
    for operation in operations:
        examples = 3 if operation.method.upper() == "POST" else 25  # a POST runs a whole analysis

        @settings(
            max_examples=examples,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=operation.as_strategy())
        def run(case: schemathesis.Case) -> None:
            nonlocal checked
            for headers in ({"Authorization": f"Bearer {TOKEN}"}, {}):
                response = case.call(base_url=server.base_url, headers=headers, timeout=60)
                checked += 1
                statuses.add(response.status_code)
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
                    )
                    continue
                try:
                    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
                except (
                    Exception
                ) as exc:  # schemathesis raises its check failures (AssertionError, FailureGroup)
                    failures.append(f"{case.method} {case.formatted_path}: {exc}"[:600])

        run()
    assert checked > 100
    # The generated requests reached real answers, the auth check and the validation errors.
    assert {200, 401, 422} <= statuses, statuses
    assert not failures, "\n".join(failures[:10]) + f"\n{server.log_tail()}"
