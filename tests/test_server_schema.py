"""The server's own OpenAPI schema, fuzzed: schemathesis generates requests for every operation (valid by
the schema, and invalid ones) and each answer must be no 5xx, a documented status, a documented content
type and a body that matches its documented schema. Bounded: a few examples per operation, a time cap."""
import time

import pytest

for _name in ("fastapi", "uvicorn", "prometheus_client", "httpx", "schemathesis", "hypothesis"):
    pytest.importorskip(_name)

import httpx  # noqa: E402
import hypothesis  # noqa: E402
import schemathesis  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from minimax_m1.engine.builder import EngineArgs, build_engine  # noqa: E402
from minimax_m1.server.api import build_app  # noqa: E402
from server_util import TIMEOUT, running  # noqa: E402

EXAMPLES = {"POST": 60, "GET": 8}  # per operation and mode (valid, invalid)
TIME_CAP_S = 90.0
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_schema_documents_request_bodies_and_errors():
    engine = build_engine(EngineArgs(model="tiny", max_model_len=128, progress=False))
    schema = build_app(engine, ["tiny"]).openapi()
    components = schema["components"]["schemas"]
    for path, model in [("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")]:
        post = schema["paths"][path]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(model)
        assert {"400", "413", "415", "500", "503"} <= set(post["responses"])
        assert post["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
        assert "text/event-stream" in post["responses"]["200"]["content"]
    assert components["CompletionRequest"]["properties"]["top_k"]["anyOf"][0]["maximum"] == 2**31 - 1
    assert "ChatMessage" in components and "ErrorResponse" in components


def test_schemathesis_finds_no_server_error_and_no_schema_violation():
    engine = build_engine(EngineArgs(model="tiny", max_model_len=128, max_num_seqs=8, progress=False))
    app = build_app(engine, ["tiny"], max_request_seconds=2.0, max_num_seqs_per_request=16)
    with running(app) as url:
        schema = schemathesis.openapi.from_dict(httpx.get(url + "/openapi.json", timeout=TIMEOUT).json())
        deadline = time.monotonic() + TIME_CAP_S
        failures, counts = [], {}
        for result in schema.get_all_operations():
            op = result.ok()
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                if op.method.upper() == "GET" and mode is schemathesis.GenerationMode.NEGATIVE \
                        and not op.path_parameters:
                    continue  # nothing in a plain GET to make invalid

                @hypothesis.settings(max_examples=EXAMPLES[op.method.upper()], deadline=None, database=None,
                                     derandomize=True, suppress_health_check=list(hypothesis.HealthCheck),
                                     phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
                @hypothesis.given(case=op.as_strategy(generation_mode=mode))
                def check(case):
                    if time.monotonic() > deadline:
                        return
                    counts[op.label] = counts.get(op.label, 0) + 1
                    checks = CHECKS + ([negative_data_rejection] if mode is schemathesis.GenerationMode.NEGATIVE
                                       else [])
                    try:
                        case.call_and_validate(base_url=url, checks=checks, timeout=TIMEOUT)
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except BaseException as e:  # noqa: BLE001 - schemathesis raises failure groups; collect all
                        failures.append(f"{op.label} {mode.value}: {e}")

                try:
                    check()
                except hypothesis.errors.Unsatisfiable:  # no invalid value exists (a free-form string path)
                    assert mode is schemathesis.GenerationMode.NEGATIVE and op.method.upper() == "GET", op.label
        assert not failures, "\n\n".join(failures[:5])
        print(counts)
        assert len(counts) >= 7 and all(n >= 20 for op, n in counts.items() if op.startswith("POST")), counts
        assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200
