"""The Ray Serve app over real HTTP: a real local Ray cluster, the real project pipeline, a random-weight
model in the export format, the shipped serve_config.yaml run by `serve run`, plain HTTP and the
official openai client.

Two applications share the cluster: ``retro`` (the YAML, index=local, bearer-token auth) and
``sharded`` (started by ``serve_main``, index=sharded, no auth). Random weights give gibberish, so the
checks are on structure, token counts, determinism (greedy, seeds, batched vs alone, local vs
sharded index, stream vs not), the neighbours returned, and error codes and messages.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
import yaml
from ray import serve

from retro_ray.errors import RetroRayError
from retro_ray.project import Project
from retro_ray.retrieval.chunks import ChunkDatabase
from retro_ray.serve.app import build_app, serve_main
from retro_ray.serve.config import ServeConfig
from tests.support import copy_project, write_random_export

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "serve_config.yaml"
TOKEN = f"test-{uuid.uuid4().hex}"
MODEL = "model"  # the served name: the checkpoint file's stem
MAX_TOKENS = 600
LIMITS = {"max_prompt_tokens": 96, "max_tokens_to_generate": MAX_TOKENS, "max_prompts_per_request": 4,
          "max_batch_size": 8, "batch_wait_timeout_s": 0.02, "min_replicas": 1, "max_replicas": 1,
          "generator_num_cpus": 0.4, "embedder_num_cpus": 0.1, "ingress_num_cpus": 0.05}
NEW_DOC = {"title": "Zorblaxian tea ceremony",
           "text": "The Zorblaxian tea ceremony is a ritual of the moon Zorblax in which quartz kettles are warmed "
                   "by bioluminescent moss. Zorblaxian tea masters brew violet leaves for exactly nineteen minutes "
                   "while reciting the names of the eleven comets. The ceremony ends when the moss fades."}
PROMPT = "The history of mathematics"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, timeout_s: float = 240.0) -> dict:
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        try:
            r = requests.get(f"{url}/health", timeout=5)
            if r.status_code == 200:
                return r.json()
            last = r.text
        except requests.RequestException as e:
            last = str(e)
        time.sleep(1)
    raise AssertionError(f"{url} not healthy after {timeout_s}s: {last}\n{serve.status()}")


# --------------------------------------------------------------------------------------------------
# Fixtures: cluster, project, model, the two applications
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(serve_cluster, small_project, tmp_path_factory) -> Project:
    return copy_project(small_project, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def model(project) -> Path:
    return write_random_export(project.root.parent / "model.pt", project)


@pytest.fixture(scope="module")
def app(serve_cluster, project, model, tmp_path_factory) -> str:
    """The shipped serve_config.yaml pointed at the test project, with a token, run by `serve run`."""
    cfg = yaml.safe_load(SERVE_CONFIG.read_text())
    port = _free_port()
    cfg["http_options"]["port"] = port
    spec = cfg["applications"][0]
    spec["args"].update(project_dir=str(project.root), checkpoint=str(model), **LIMITS)
    spec["runtime_env"]["env_vars"]["RETRO_RAY_API_TOKEN"] = TOKEN
    path = tmp_path_factory.mktemp("conf") / "serve_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RETRO_RAY_API_TOKEN"}
    r = subprocess.run([str(Path(sys.executable).parent / "serve"), "run", "--non-blocking", str(path)],
                       capture_output=True, text=True, env={**env, "RAY_ADDRESS": serve_cluster}, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url)
    return url


@pytest.fixture(scope="module")
def sharded(app, project, model) -> str:
    """A second application through serve_main (what `retro-ray serve` calls): sharded index, no token."""
    port = int(app.rsplit(":", 1)[1])
    cfg = ServeConfig(port=port, app_name="sharded", route_prefix="/sharded", index="sharded",
                      **{k: v for k, v in LIMITS.items()})
    saved = os.environ.pop("RETRO_RAY_API_TOKEN", None)
    try:
        url = serve_main(str(model), str(project.root), cfg, blocking=False)
    finally:
        if saved is not None:
            os.environ["RETRO_RAY_API_TOKEN"] = saved
    assert url == f"http://127.0.0.1:{port}/sharded"
    _wait_healthy(url)
    return url


@pytest.fixture(scope="module")
def http():
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {TOKEN}"
    return s


def _generate(http, url: str, **body) -> dict:
    r = http.post(f"{url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _health(url: str) -> dict:
    r = requests.get(f"{url}/health", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["generator"]


def _sse_events(resp) -> list:
    events = []
    for line in resp.iter_lines(decode_unicode=True):
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


# --------------------------------------------------------------------------------------------------
# The config file and the builder (no cluster needed)
# --------------------------------------------------------------------------------------------------


def test_shipped_serve_config_is_valid():
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    cfg = yaml.safe_load(SERVE_CONFIG.read_text())
    ServeDeploySchema.model_validate(cfg)
    (spec,) = cfg["applications"]
    assert not set(spec) - set(ServeApplicationSchema.model_fields)
    assert spec["import_path"] == "retro_ray.serve.app:build_app"
    fields = set(ServeConfig.__dataclass_fields__)
    assert {"project_dir", "checkpoint"} <= set(spec["args"]) <= fields | {"project_dir", "checkpoint"}


def test_build_app_rejects_bad_args(tmp_path):
    with pytest.raises(RetroRayError, match="no checkpoint given"):
        build_app({"project_dir": str(tmp_path)})
    with pytest.raises(RetroRayError, match=r"checkpoint .*missing\.pt does not exist"):
        build_app({"project_dir": str(tmp_path), "checkpoint": str(tmp_path / "missing.pt")})
    with pytest.raises(RetroRayError, match="unknown config key max_batch; accepted keys"):
        build_app({"checkpoint": "x", "max_batch": 3})
    with pytest.raises(RetroRayError, match="max_batch_size=0; it must be at least 1"):
        build_app({"checkpoint": "x", "max_batch_size": 0})
    with pytest.raises(RetroRayError, match=r"serve index='faiss' is not one of local, sharded, none"):
        build_app({"checkpoint": "x", "index": "faiss"})
    (tmp_path / "m.pt").write_bytes(b"x")
    with pytest.raises(RetroRayError, match="index=local needs project_dir"):
        build_app({"checkpoint": str(tmp_path / "m.pt")})


def test_serve_config_help_texts():
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(ServeConfig))


# --------------------------------------------------------------------------------------------------
# Health and auth
# --------------------------------------------------------------------------------------------------


def test_health_is_open_and_describes_the_generator(app, project):
    r = requests.get(f"{app}/health", timeout=30)  # no token
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model"] == MODEL
    assert body["generator"]["retrieval"] == "local"
    assert body["generator"]["database_chunks"] == len(ChunkDatabase(project))


def test_openapi_docs_are_open(app):
    r = requests.get(f"{app}/openapi.json", timeout=30)
    assert r.status_code == 200
    spec = r.json()
    assert {"/generate", "/v1/completions", "/v1/models", "/health", "/documents"} <= set(spec["paths"])
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert "GenerateRequest" in spec["components"]["schemas"] and "CompletionRequest" in spec["components"]["schemas"]
    r = requests.get(f"{app}/docs", timeout=30)
    assert r.status_code == 200 and "swagger" in r.text.lower()


@pytest.mark.parametrize("method,path,body", [
    ("post", "/generate", {"prompt": "x"}),
    ("post", "/v1/completions", {"model": MODEL, "prompt": "x"}),
    ("get", "/v1/models", None),
    ("post", "/documents", {"documents": [{"title": "t", "text": "x"}]}),
    ("post", "/generate", "{not json"),  # refused before the body is read
])
def test_auth_required(app, method, path, body):
    kw = {"data": body} if isinstance(body, str) else {"json": body}
    r = getattr(requests, method)(f"{app}{path}", timeout=30, **kw)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error"
    assert "missing bearer token" in r.json()["error"]["message"]
    r = getattr(requests, method)(f"{app}{path}", timeout=30, headers={"Authorization": "Bearer nope"}, **kw)
    assert r.status_code == 401 and "wrong bearer token" in r.json()["error"]["message"]
    r = getattr(requests, method)(f"{app}{path}", timeout=30, headers={"Authorization": f"Basic {TOKEN}"}, **kw)
    assert r.status_code == 401


# --------------------------------------------------------------------------------------------------
# /generate
# --------------------------------------------------------------------------------------------------


def test_generate_returns_text_tokens_and_the_neighbours_used(app, http, project):
    out = _generate(http, app, prompt=PROMPT, tokens_to_generate=70, greedy=True)
    assert out["model"] == MODEL
    (g,) = out["generations"]
    tok = ChunkDatabase(project).tokenizer
    assert g["prompt"] == PROMPT
    assert g["prompt_tokens"] == len(tok.encode(PROMPT).ids)
    assert g["finish_reason"] in ("length", "eod")
    if g["finish_reason"] == "length":
        assert len(g["tokens"]) == 70
    assert g["text"] == tok.decode(g["tokens"], skip_special_tokens=True)
    # Retrieval at the prompt's last token, then at the chunk boundary the generation crosses (64 tokens).
    positions = [e["position"] for e in g["retrievals"]]
    assert positions[0] == g["prompt_tokens"] - 1
    if g["prompt_tokens"] + len(g["tokens"]) > 64:
        assert 63 in positions
    titles = pq.read_table(project.docs_path, columns=["title"]).column("title").to_pylist()
    db = ChunkDatabase(project)
    first = g["retrievals"][0]
    assert first["query"] == PROMPT
    assert len(first["neighbors"]) == 2  # retro_num_neighbors default
    for n in first["neighbors"]:
        assert 0 <= n["chunk_id"] < len(db)
        assert n["doc_id"] == int(db.global_doc_ids([n["chunk_id"]])[0])
        assert n["title"] == titles[n["doc_id"]]
        assert n["text"] == db.texts([n["chunk_id"]])[0] and n["text"]
        assert n["distance"] >= 0
    # Greedy is deterministic.
    assert _generate(http, app, prompt=PROMPT, tokens_to_generate=70, greedy=True)["generations"][0] == g


def test_curl_style_form_encoded_json_body(app, http):
    # `curl -d '{...}'` sends Content-Type application/x-www-form-urlencoded; the body is JSON all the same.
    body = json.dumps({"prompt": PROMPT, "tokens_to_generate": 3, "greedy": True})
    for ctype in ("application/x-www-form-urlencoded", "text/plain"):
        r = http.post(f"{app}/generate", data=body, headers={"Content-Type": ctype}, timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["generations"][0]["tokens"]) == 3


def test_generate_seeds_and_settings(app, http):
    def sample(seed):
        return _generate(http, app, prompt=PROMPT, tokens_to_generate=16, seed=seed, top_k=50, top_p=1.0,
                         temperature=1.3)["generations"][0]["tokens"]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    out = _generate(http, app, prompt=PROMPT, tokens_to_generate=8, greedy=True, retrieve=False)["generations"][0]
    assert out["retrievals"] == []
    out = _generate(http, app, prompt=PROMPT, tokens_to_generate=8, greedy=True, retro_num_neighbors=3)["generations"][0]
    assert len(out["retrievals"][0]["neighbors"]) == 3


def test_generate_with_given_neighbours_and_several_prompts(app, http):
    given = ["Paris is the capital of France.", "The Seine flows through Paris."]
    (g,) = _generate(http, app, prompt="France", neighbours=given, tokens_to_generate=6, greedy=True)["generations"]
    (event,) = g["retrievals"]
    assert [n["text"] for n in event["neighbors"]] == given
    assert all(n["chunk_id"] == -1 and n["doc_id"] == -1 and n["distance"] is None for n in event["neighbors"])
    prompts = ["Alpha", "Beta gamma", "Delta"]
    per_prompt = [["one"], ["two", "three"], ["four"]]
    gens = _generate(http, app, prompts=prompts, neighbors=per_prompt, tokens_to_generate=5, greedy=True)["generations"]
    assert [g["prompt"] for g in gens] == prompts
    assert [[n["text"] for n in g["retrievals"][0]["neighbors"]] for g in gens] == per_prompt


# --------------------------------------------------------------------------------------------------
# /v1/completions, /v1/models: plain HTTP and the openai client
# --------------------------------------------------------------------------------------------------


def test_completions_match_generate(app, http):
    want = _generate(http, app, prompt=PROMPT, tokens_to_generate=12, greedy=True)["generations"][0]
    r = http.post(f"{app}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0},
                  timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice == {"text": want["text"], "index": 0, "logprobs": None,
                      "finish_reason": "length" if want["finish_reason"] == "length" else "stop"}
    assert body["usage"] == {"prompt_tokens": want["prompt_tokens"], "completion_tokens": len(want["tokens"]),
                             "total_tokens": want["prompt_tokens"] + len(want["tokens"])}
    r = http.get(f"{app}/v1/models", timeout=30)
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [MODEL]


def test_completions_stream_as_server_sent_events(app, http):
    want = _generate(http, app, prompt=PROMPT, tokens_to_generate=20, greedy=True)["generations"][0]
    with http.post(f"{app}/v1/completions", stream=True, timeout=60,
                   json={"model": MODEL, "prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stream": True,
                         "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r)
    assert events[-1] == "[DONE]"
    usage, chunks = events[-2], events[:-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(want["tokens"])
    assert len(chunks) >= 2  # streamed, not one answer
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == want["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] in ("length", "stop")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_openai_client(app, http):
    import openai

    want = _generate(http, app, prompt=PROMPT, tokens_to_generate=10, greedy=True)["generations"][0]["text"]
    client = openai.OpenAI(base_url=f"{app}/v1", api_key=TOKEN, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    assert out.choices[0].text == want and out.usage.completion_tokens <= 10
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == want
    given = client.completions.create(model=MODEL, prompt=["Rome", "Oslo"], max_tokens=4, temperature=0,
                                      extra_body={"neighbors": ["The Colosseum is in Rome."]})
    assert [c.index for c in given.choices] == [0, 1]
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' is not served here"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{app}/v1", api_key="wrong", max_retries=0).models.list()


# --------------------------------------------------------------------------------------------------
# The OpenAI completion fields clients send: stop, seed, user (supported); echo, logprobs,
# presence_penalty, frequency_penalty (refused by name unless neutral)
# --------------------------------------------------------------------------------------------------

SAMPLED = {"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 1.3, "seed": 7}


def _complete(http, url: str, **body) -> dict:
    r = http.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _stop_string(text: str) -> str:
    """A word of the text, not at its start, that a stop test can end the text at."""
    words = [m.group() for m in re.finditer(r"[A-Za-z]{3,}", text) if m.start() > 0]
    assert words, f"no word to stop at in {text!r}"
    return words[len(words) // 2]


def test_completions_stop_ends_the_text_before_the_stop_string(app, http):
    full = _complete(http, app, **SAMPLED)["choices"][0]
    assert full["finish_reason"] == "length"
    stop = _stop_string(full["text"])
    want = full["text"][: full["text"].find(stop)]
    for given in (stop, [stop], ["no such text anywhere", stop]):
        out = _complete(http, app, **SAMPLED, stop=given)
        (choice,) = out["choices"]
        assert choice["text"] == want and stop not in choice["text"]
        assert choice["finish_reason"] == "stop"
        assert out["usage"]["completion_tokens"] < SAMPLED["max_tokens"]
    # A stop string the text never holds changes nothing.
    assert _complete(http, app, **SAMPLED, stop=["no such text anywhere"])["choices"][0] == full


def test_completions_stop_streamed_never_sends_the_stop_string(app, http):
    full = _complete(http, app, **SAMPLED)["choices"][0]["text"]
    stop = _stop_string(full)
    with http.post(f"{app}/v1/completions", stream=True, timeout=120,
                   json={**SAMPLED, "stop": stop, "stream": True}) as r:
        assert r.status_code == 200, r.text
        events = _sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[: full.find(stop)]
    assert all(stop not in c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completions_seed_makes_sampling_reproducible(app, http):
    a = _complete(http, app, **SAMPLED)["choices"][0]["text"]
    assert _complete(http, app, **SAMPLED)["choices"][0]["text"] == a
    assert _complete(http, app, **{**SAMPLED, "seed": 8})["choices"][0]["text"] != a
    with http.post(f"{app}/v1/completions", stream=True, timeout=120, json={**SAMPLED, "stream": True}) as r:
        assert "".join(c["choices"][0]["text"] for c in _sse_events(r)[:-1]) == a  # streamed: the same text
    two = _complete(http, app, **{**SAMPLED, "prompt": [PROMPT, PROMPT]})["choices"]
    assert [c["text"] for c in two] == [a, a]  # the seed is each prompt's


def test_completions_user_is_accepted_and_not_used(app, http):
    for body in (SAMPLED, {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}):
        want = _complete(http, app, **body)["choices"]
        assert _complete(http, app, **body, user="end-user-1234")["choices"] == want


@pytest.mark.parametrize("field,value,message", [
    ("echo", True, "echo=true is not supported"),
    ("logprobs", 0, "logprobs are not supported"),
    ("logprobs", 5, "logprobs are not supported"),
    ("presence_penalty", 0.5, r"presence_penalty=0\.5 is not supported; leave it at 0"),
    ("frequency_penalty", -1.0, r"frequency_penalty=-1\.0 is not supported; leave it at 0"),
])
def test_unimplemented_openai_fields_are_refused_by_name(app, http, field, value, message):
    for stream in (False, True):
        r = http.post(f"{app}/v1/completions", json={"model": MODEL, "prompt": PROMPT, field: value, "stream": stream},
                      timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert re.search(message, err["message"]) and err["param"] == field
        assert err["type"] == "invalid_request_error" and err["code"] == "unsupported_parameter"


def test_openai_fields_at_their_neutral_values_are_accepted(app, http):
    want = _complete(http, app, **SAMPLED)["choices"]
    neutral = {"echo": False, "logprobs": None, "presence_penalty": 0, "frequency_penalty": 0.0, "user": None,
               "stop": None, "n": 1, "best_of": 1}
    assert _complete(http, app, **SAMPLED, **neutral)["choices"] == want


def test_openai_client_sends_stop_seed_and_user(app, http):
    import openai

    client = openai.OpenAI(base_url=f"{app}/v1", api_key=TOKEN, max_retries=0)
    args = {k: v for k, v in SAMPLED.items() if k != "model"}
    full = client.completions.create(model=MODEL, **args)
    assert full.choices[0].text == _complete(http, app, **SAMPLED)["choices"][0]["text"]
    assert client.completions.create(model=MODEL, **args, user="end-user-1234").choices[0].text == full.choices[0].text
    stop = _stop_string(full.choices[0].text)
    cut = client.completions.create(model=MODEL, **args, stop=[stop])
    assert cut.choices[0].text == full.choices[0].text[: full.choices[0].text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, **args, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    for field, value in (("echo", True), ("logprobs", 1), ("presence_penalty", 0.5), ("frequency_penalty", 0.5)):
        with pytest.raises(openai.BadRequestError, match=f"{field}.* not supported") as e:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, **{field: value})
        assert e.value.param == field


# --------------------------------------------------------------------------------------------------
# Bad input: a 4xx with a message, never a 500, never a dead replica
# --------------------------------------------------------------------------------------------------

BAD = [
    ("/generate", "{not json", 400, "the request body is not valid JSON"),
    ("/generate", None, 400, "the request body is missing"),
    ("/generate", [1, 2], 400, "the request body must be a JSON object"),
    ("/generate", {}, 400, "give `prompt` .* or `prompts`"),
    ("/generate", {"prompt": "a", "prompts": ["b"]}, 400, "not both"),
    ("/generate", {"prompt": ""}, 400, "a prompt is empty"),
    ("/generate", {"prompts": []}, 400, "`prompts` is empty"),
    ("/generate", {"prompts": ["ok", ""]}, 400, "a prompt is empty"),
    ("/generate", {"prompt": 5}, 400, r"prompt: Input should be a valid string \(got 5\)"),
    ("/generate", {"prompt": ["x"]}, 400, "prompt: Input should be a valid string"),
    ("/generate", {"prompt": "x", "tokens_to_generate": "5"}, 400, "tokens_to_generate: Input should be a valid integer"),
    ("/generate", {"prompt": "x", "tokens_to_generate": 2.5}, 400, "tokens_to_generate: Input should be a valid integer"),
    ("/generate", {"prompt": "x", "tokens_to_generate": 0}, 400, "tokens_to_generate=0; ask for at least 1 token"),
    ("/generate", {"prompt": "x", "tokens_to_generate": -4}, 400, "tokens_to_generate=-4; ask for at least 1 token"),
    ("/generate", {"prompt": "x", "tokens_to_generate": MAX_TOKENS + 1}, 400,
     f"tokens_to_generate={MAX_TOKENS + 1} is over this server's limit of {MAX_TOKENS}"),
    ("/generate", {"prompt": "x", "greedy": 1}, 400, "greedy: Input should be a valid boolean"),
    ("/generate", {"prompt": "x", "temperature": 0}, 400, r"temperature=0\.0: must be > 0"),
    ("/generate", {"prompt": "x", "top_p": 1.5}, 400, r"top_p=1\.5: must be in \(0, 1\]"),
    ("/generate", {"prompt": "x", "top_k": -1}, 400, "top_k=-1: must be a whole number"),
    ("/generate", {"prompt": "x", "retro_num_neighbors": 0}, 400, "retro_num_neighbors=0: must be a whole number ≥ 1"),
    ("/generate", {"prompt": "x", "end_strings": "stop"}, 400, "end_strings must be a list of strings"),
    ("/generate", {"prompt": "x", "neighbors": "a text"}, 400, "neighbors must be a list of strings"),
    ("/generate", {"prompt": "x", "neighbors": [1, 2]}, 400, "neighbors must be a list of strings"),
    ("/generate", {"prompt": "x", "neighbors": [["a"], "b"]}, 400, "neighbors must be a list of strings"),
    ("/generate", {"prompt": "x", "neighbors": [["a"], ["b"]]}, 400, "neighbors has 2 lists for 1 prompts"),
    ("/generate", {"prompt": "x", "bogus": 1}, 400, "unknown field 'bogus'"),
    ("/generate", {"prompt": "word " * 200}, 400, r"the prompt is \d+ tokens, over this server's limit of 96"),
    ("/generate", {"prompt": "x" * 20000}, 400, "characters, far over this server's limit of 96 tokens"),
    ("/generate", {"prompts": ["a"] * 5}, 400, "5 prompts in one request; the limit is 4"),
    ("/generate", {"prompts": ["fine", "word " * 200]}, 400, r"prompt 1: the prompt is \d+ tokens"),
    ("/v1/completions", {"prompt": "x"}, 400, "'model' is required"),
    ("/v1/completions", {"model": MODEL}, 400, "'prompt' is required"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model 'nope' is not served here; this server serves 'model'"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2]}, 400, "token-id prompts are not supported"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt is an empty list"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 3}, 400, "n=3 is not supported"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens=0; ask for at least 1 token"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": MAX_TOKENS + 1}, 400, "over this server's limit"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": MAX_TOKENS + 1, "stream": True}, 400,
     "over this server's limit"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 200, "stream": True}, 400, r"the prompt is \d+ tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 2}, 400, "logprobs are not supported"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": 7}, 400, "stop must be a list of strings"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, r"top_p=0\.0: must be in \(0, 1\]"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, r"temperature=-0\.5: must be ≥ 0"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ""}, 400, "stop holds an empty string"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a", ""]}, 400, "stop holds an empty string"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 2**64}, 400, f"seed={2**64} is out of range"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 1.5}, 400, "seed: Input should be a valid integer"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "user": 7}, 400, "user: Input should be a valid string"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, 400, "echo=true is not supported"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 2.0}, 400, "presence_penalty=2.0 is not supported"),
    ("/generate", {"prompt": "x", "end_strings": ["a", ""]}, 400, "end_strings holds an empty string"),
    ("/generate", {"prompt": "x", "seed": -(2**63) - 1}, 400, "is out of range; give a whole number from -2\\*\\*63"),
    ("/documents", {"documents": []}, 400, "documents is empty"),
    ("/documents", {"documents": [{"title": "t"}]}, 400, "'documents.0.text' is required"),
    ("/documents", {"documents": [{"text": "  "}]}, 400, "a document's text is empty"),
    ("/documents", {"docs": []}, 400, "unknown field 'docs'"),
]


@pytest.mark.parametrize("path,body,status,message", BAD, ids=[f"{i}:{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_with_a_message(app, http, path, body, status, message):
    import re

    if isinstance(body, str):
        r = http.post(f"{app}{path}", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    elif body is None:
        r = http.post(f"{app}{path}", timeout=60)
    else:
        r = http.post(f"{app}{path}", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert re.search(message, err["message"]), err["message"]
    assert "\n" not in err["message"] and "Traceback" not in err["message"]
    assert err["type"] in ("invalid_request_error", "not_found_error")


def test_an_error_raised_in_the_generator_replica_keeps_its_fields(app, http):
    # Refused inside the RetroGenerator deployment (it counts tokens), so it crossed a deployment.
    for body, message in (({"prompt": "word " * 200}, r"^the prompt is \d+ tokens"),
                          ({"prompts": ["fine", "word " * 200]}, r"^prompt 1: the prompt is \d+ tokens")):
        r = http.post(f"{app}/generate", json=body, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert re.search(message, err["message"]), err["message"]
        assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "context_length_exceeded", "prompt")


def test_unknown_route_and_method(app, http):
    r = http.get(f"{app}/nope", timeout=30)
    assert r.status_code == 404 and "no endpoint /nope" in r.json()["error"]["message"]
    r = http.get(f"{app}/generate", timeout=30)
    assert r.status_code == 405 and "GET is not allowed on /generate" in r.json()["error"]["message"]


def test_the_replica_survived_the_bad_input(app, http):
    before = _health(app)
    assert _generate(http, app, prompt=PROMPT, tokens_to_generate=3, greedy=True)["generations"][0]["tokens"]
    after = _health(app)
    assert after["replica"] == before["replica"]  # same replica process: nothing killed it
    assert after["requests"] == before["requests"] + 1


# --------------------------------------------------------------------------------------------------
# Load, streaming disconnects
# --------------------------------------------------------------------------------------------------


def test_32_concurrent_requests_all_answered_correctly(app, http):
    prompts = [f"Topic number {i}: the {w}" for i, w in enumerate(["river", "painting", "war", "planet"] * 8)]
    alone = {p: _generate(http, app, prompt=p, tokens_to_generate=10, greedy=True)["generations"][0]
             for p in prompts[:4]}
    batches_before = _health(app)["batches"]

    def one(p):
        r = http.post(f"{app}/generate", json={"prompt": p, "tokens_to_generate": 10, "greedy": True}, timeout=300)
        return r.status_code, r.json()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, prompts))
    for p, (status, body) in zip(prompts, results):
        assert status == 200, body
        (g,) = body["generations"]
        assert g["prompt"] == p  # nobody got someone else's answer
        assert len(g["tokens"]) == 10 or g["finish_reason"] == "eod"
    for p, g in alone.items():  # batched with others, a request decodes as it does alone
        assert results[prompts.index(p)][1]["generations"][0]["tokens"] == g["tokens"]
    after = _health(app)
    assert after["largest_batch"] > 1
    assert after["batches"] - batches_before < 32  # requests were batched together


def test_a_client_that_disconnects_mid_stream_frees_its_slot(app, http):
    before = _health(app)
    with http.post(f"{app}/v1/completions", stream=True, timeout=60,
                   json={"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                         "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: ")
    # The connection is closed after the first event: the row must stop decoding ("cancelled")
    # long before MAX_TOKENS tokens.
    deadline = time.time() + 60
    while time.time() < deadline:
        now = _health(app)
        # the row is counted as cancelled a moment before its batch hands the slot back
        if now["finish_reasons"].get("cancelled", 0) > before["finish_reasons"].get("cancelled", 0) \
                and now["active_rows"] == 0:
            break
        time.sleep(0.2)
    assert now["finish_reasons"].get("cancelled", 0) == before["finish_reasons"].get("cancelled", 0) + 1, now
    assert now["generated_tokens"] - before["generated_tokens"] < MAX_TOKENS
    assert now["active_rows"] == 0
    # And the slot serves the next request.
    assert _generate(http, app, prompt=PROMPT, tokens_to_generate=4, greedy=True)["generations"][0]["tokens"]


# --------------------------------------------------------------------------------------------------
# serve_main + sharded index; knowledge update
# --------------------------------------------------------------------------------------------------


def test_sharded_application_answers_like_the_local_one(app, sharded, http):
    health = requests.get(f"{sharded}/health", timeout=30).json()["generator"]
    assert health["retrieval"] == "sharded"
    a = _generate(http, app, prompt=PROMPT, tokens_to_generate=12, greedy=True)
    b = requests.post(f"{sharded}/generate", json={"prompt": PROMPT, "tokens_to_generate": 12, "greedy": True}, timeout=120)
    assert b.status_code == 200, b.text  # no token needed: this application was started without one
    assert b.json() == a


def test_added_documents_are_retrieved_by_every_replica(app, sharded, http, project):
    n_docs = pq.ParquetFile(project.docs_path).metadata.num_rows
    n_chunks = len(ChunkDatabase(project))
    r = http.post(f"{app}/documents", json={"documents": [NEW_DOC]}, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["added"] == 1 and r.json()["report"]["counts"]["docs_added"] == 1
    prompt = NEW_DOC["text"][:80]

    def neighbours(url, session):
        out = session.post(f"{url}/generate", json={"prompt": prompt, "tokens_to_generate": 2, "greedy": True,
                                                     "retro_num_neighbors": 3}, timeout=120)
        assert out.status_code == 200, out.text
        return out.json()["generations"][0]["retrievals"][0]["neighbors"]

    for url, session in ((app, http), (sharded, requests.Session())):  # the replica that added, and another one
        found = [n for n in neighbours(url, session) if n["title"] == NEW_DOC["title"]]
        assert found, url
        assert found[0]["doc_id"] == n_docs and found[0]["chunk_id"] >= n_chunks
        assert found[0]["text"] in NEW_DOC["text"]
    # Adding it again adds nothing.
    again = http.post(f"{app}/documents", json={"documents": [NEW_DOC]}, timeout=300).json()
    assert again["added"] == 0 and again["report"]["counts"]["docs_skipped_already_added"] == 1
