"""The serve package's request schemas and its error type, without a cluster (the HTTP behaviour is
tested against a real Serve app in tests/integration/test_serve.py)."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from retro_ray.serve.errors import RequestError, from_deployment_failure
from retro_ray.serve.generate import InferenceConfig
from retro_ray.serve.schemas import DEFAULT_TOKENS_TO_GENERATE, CompletionRequest, GenerateRequest


def _refusal(model, body: dict) -> tuple[str, tuple, str]:
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    (err,) = e.value.errors()
    return err["type"], err["loc"], err["msg"]


def test_the_limit_check_uses_the_generators_default_token_count():
    # /generate without tokens_to_generate is checked against max_tokens_to_generate with this number.
    assert DEFAULT_TOKENS_TO_GENERATE == InferenceConfig().tokens_to_generate
    assert GenerateRequest(prompt="x").tokens_requested() == ("tokens_to_generate", InferenceConfig().tokens_to_generate)
    assert CompletionRequest(model="m", prompt="x", max_tokens=None).tokens_requested() == ("max_tokens", 16)


def test_completion_settings_map_openai_names_to_the_generators():
    s = CompletionRequest(model="m", prompt="x", max_tokens=5, temperature=0, stop="\n", seed=3, user="u").settings()
    assert s["greedy"] is True and "temperature" not in s
    assert (s["tokens_to_generate"], s["end_strings"], s["seed"], s["top_p"]) == (5, ["\n"], 3, 1.0)
    s = CompletionRequest(model="m", prompt=["a", "b"], temperature=0.7).settings()
    assert s["temperature"] == 0.7 and "greedy" not in s and s["end_strings"] is None
    # Every generator setting a request can carry is an InferenceConfig field (or a retro_inference one).
    names = set(InferenceConfig.__dataclass_fields__) | {"retro_num_neighbors", "retrieve"}
    assert set(s) <= names and set(GenerateRequest(prompt="x").settings()) <= names


@pytest.mark.parametrize("model,body,loc,message", [
    (GenerateRequest, {"prompt": "x", "temperature": 0}, "temperature", "temperature=0.0: must be > 0"),
    (CompletionRequest, {"model": "m", "prompt": "x", "temperature": -1}, "temperature", "temperature=-1.0: must be ≥ 0"),
    (CompletionRequest, {"model": "m", "prompt": "x", "top_p": 1.01}, "top_p", "top_p=1.01: must be in (0, 1]"),
    (GenerateRequest, {"prompt": "x", "top_k": -2}, "top_k", "top_k=-2: must be a whole number ≥ 0"),
    (GenerateRequest, {"prompt": "x", "min_tokens_to_generate": -1}, "min_tokens_to_generate", "must be a whole number ≥ 0"),
    (CompletionRequest, {"model": "m", "prompt": "x", "retro_num_neighbors": 0}, "retro_num_neighbors", "must be a whole number ≥ 1"),
    (CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": -3}, "max_tokens", "max_tokens=-3; ask for at least 1 token"),
    (GenerateRequest, {"prompt": "x", "seed": 2**64}, "seed", "is out of range"),
    (CompletionRequest, {"model": "m", "prompt": "x", "stop": ["", "b"]}, "stop", "stop holds an empty string"),
    (CompletionRequest, {"model": "m", "prompt": "x", "frequency_penalty": 0.1}, "frequency_penalty",
     "frequency_penalty=0.1 is not supported"),
    (CompletionRequest, {"model": "m", "prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias", "logit_bias is not supported"),
])
def test_ranges_and_unsupported_fields_are_refused_by_the_schema(model, body, loc, message):
    kind, where, msg = _refusal(model, body)
    assert kind == "request_value" and where == (loc,)
    assert message in msg and "\n" not in msg


def test_edges_of_the_ranges_are_accepted():
    GenerateRequest(prompt="x", temperature=1e-6, top_p=1.0, top_k=0, seed=-(2**63), min_tokens_to_generate=0)
    CompletionRequest(model="m", prompt="x", temperature=0, seed=2**64 - 1, presence_penalty=0, frequency_penalty=0.0,
                      echo=False, logprobs=None, logit_bias={}, suffix="", user="anyone")


def test_request_error_keeps_its_fields_through_pickle_and_ray():
    from ray.exceptions import RayTaskError

    err = RequestError("the prompt is 200 tokens", 400, "context_length_exceeded", "prompt")
    back = pickle.loads(pickle.dumps(err))
    assert (back.message, back.status, back.code, back.param, back.type) == \
        ("the prompt is 200 tokens", 400, "context_length_exceeded", "prompt", "invalid_request_error")
    assert back.for_prompt(3).body()["error"]["message"] == "prompt 3: the prompt is 200 tokens"
    # What a replica's raise becomes on the caller's side: a RayTaskError around it (and its dual-class form).
    try:
        raise err
    except RequestError as e:
        wrapped = RayTaskError("generate", "Traceback ...", e)
    for exc in (wrapped, wrapped.as_instanceof_cause()):
        got = from_deployment_failure(exc)
        assert (got.message, got.status, got.code, got.param) == (err.message, 400, "context_length_exceeded", "prompt")
    bug = RayTaskError("generate", "Traceback ...\nZeroDivisionError: division by zero", ZeroDivisionError("x"))
    assert (from_deployment_failure(bug).status, from_deployment_failure(bug).type) == (500, "server_error")
    assert from_deployment_failure(ConnectionError("actor died")).status == 503
    # The replica itself died under the call (SIGKILL, node lost): a 503 the ingress may retry once.
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import ReplicaUnavailableError

    for died in (ActorDiedError(), ReplicaUnavailableError("r1")):
        got = from_deployment_failure(died)
        assert (got.status, got.code, got.type) == (503, "replica_died", "server_error")
        assert got.message == "the generator replica serving this request died; retry"
    # ... but a replica whose own call to another actor failed that way is a 500, not a death of its own.
    inner = RayTaskError("generate", "Traceback ...", ActorDiedError())
    assert from_deployment_failure(inner.as_instanceof_cause()).status == 500
