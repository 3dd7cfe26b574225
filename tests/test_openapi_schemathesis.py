"""schemathesis: every operation of /openapi.json, fed generated and malformed requests, never gets a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error

from tests.harness import CliService, cli_service
from web.openapi import OPENAPI

schema = schemathesis.openapi.from_dict(OPENAPI)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliService]:
    with cli_service(tmp_path_factory.mktemp("schemathesis"), "routes: []\n") as running:
        yield running


def test_the_served_description_is_the_one_tested(service: CliService):
    assert service.get("/openapi.json") == OPENAPI


def _unknown_transfer_coding(case: schemathesis.Case) -> bool:
    codings = [value for name, value in (case.headers or {}).items() if name.lower() == "transfer-encoding"]
    return any(value.strip().lower() != "chunked" for value in codings)


@schemathesis.check
def not_a_server_error_but_501_for_an_unknown_transfer_coding(ctx, response, case):
    """RFC 9112 section 6.1: a transfer coding the server does not understand gets 501 (hypercorn's answer)."""
    if response.status_code == 501 and _unknown_transfer_coding(case):
        return None
    return not_a_server_error(ctx, response, case)


@schema.parametrize()
def test_no_request_gets_a_server_error(case, service: CliService):
    case.call_and_validate(base_url=service.url, checks=[not_a_server_error_but_501_for_an_unknown_transfer_coding])
