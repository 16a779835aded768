"""/openapi.json describes what the parsers accept, and no request generated from it gets a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from mlxserve.api.schemas import PARAMS, params_for
from tests.conftest import TINY
from tests.fixtures.http import request


def _operations(server) -> list:
    schema = schemathesis.openapi.from_url(server.base_url.removesuffix("/v1") + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_the_document_lists_every_request_field(tiny_server):
    document = request(tiny_server.base_url.removesuffix("/v1") + "/openapi.json").json()
    assert document["openapi"] == "3.1.0"
    chat = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(chat["properties"]) == {p.name for p in params_for("chat")} | {"messages"}
    assert chat["required"] == ["model", "messages"]
    assert chat["properties"]["temperature"]["maximum"] == 2
    assert {p.name for p in PARAMS} <= set(chat["properties"]) | {p.name for p in params_for("completions")}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_makes_a_server_error(tiny_server, mode):
    """Bounded: 20 generated requests per operation and mode, each must get an answer below 500."""
    operations = _operations(tiny_server)
    assert len(operations) == 16
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and operation.method.upper() in ("GET", "DELETE"):
            continue  # their only input is a path string: nothing in it can be of a wrong type
        @given(case=operation.as_strategy(generation_mode=mode), real_model=st.booleans())
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def no_server_error(case, real_model):
            if real_model and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = TINY  # a model that exists, so valid requests really generate
            if real_model and case.path_parameters:
                case.path_parameters["model_id"] = TINY
            case.call_and_validate(checks=[not_a_server_error], timeout=120)

        no_server_error()
    assert tiny_server.alive() and "Traceback" not in tiny_server.log()
