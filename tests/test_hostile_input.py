"""Property-based: no request body, however malformed, gets a 5xx or an unvalidated event accepted."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.events import InvalidEvent, normalize_domain
from tests.harness import CliService, cli_service

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
domains = st.one_of(
    st.from_regex(r"[a-zA-Z0-9._-]{1,40}", fullmatch=True),
    st.text(max_size=60),
    json_values,
)
event_bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.builds(
        lambda domain, extra: json.dumps({"domain": domain, **extra}).encode(),
        domains,
        st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    ),
    st.builds(
        lambda domain, event_id: json.dumps({"domain": domain, "event_id": event_id}).encode(),
        st.from_regex(r"[a-z]{1,10}\.vn", fullmatch=True),
        json_values,
    ),
)
content_types = st.sampled_from(
    ["application/json", "text/plain", "", "application/x-www-form-urlencoded", "multipart/form-data", "text/html"]
)


def _valid_domain(domain: object) -> bool:
    try:
        normalize_domain(domain)
    except InvalidEvent:
        return False
    return True


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliService]:
    with cli_service(tmp_path_factory.mktemp("hostile"), "routes: []\n") as running:
        yield running


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


# Sync tests: hypothesis runs each example itself, so the service runs in its own process.
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=event_bodies, content_type=content_types)
def test_malformed_posts_get_a_clear_4xx_never_a_5xx(
    service: CliService, client: httpx.Client, body: bytes, content_type: str
):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post(f"{service.url}/events", content=body, headers=headers)
    assert response.status_code in (202, 400, 413, 415), response.text
    answer = response.json()
    if response.status_code == 202:
        event = json.loads(body)
        assert _valid_domain(event["domain"])
        assert answer["status"] == "accepted" and answer["sequence"] >= 1
    else:
        assert answer["status"] == "error" and answer["error"]
