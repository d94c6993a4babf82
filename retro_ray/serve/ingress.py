"""The HTTP front of the service: the RetroIngress deployment and the FastAPI app it serves.

It owns the routes (POST /generate, POST /v1/completions with server-sent events, GET /v1/models,
POST /documents, GET /health, /docs), bearer-token auth, reading every POST body as JSON, the
server's limits on a request (prompts per request, tokens asked for, a prompt's size in
characters), the OpenAI answer shapes, and the turning of every error into an HTTP answer. It is
light (no torch): it talks to the generator through a handle.

The app is built in the replica, after the constructor (``__serve_build_asgi_app__``, Serve's
late-bound ingress), so the auth middleware reads the token from the app it guards
(``app.state.auth``), not from a module global.

Errors: anything refused raises ``RequestError`` (errors.py), here or in the generator replica.
``_ask`` is where a failed generator call becomes one (``from_deployment_failure``; a call whose
generator replica died under it is made once more where that is safe, else it is a 503), and
``error_response`` is the one place a RequestError becomes an HTTP answer: the RequestError
exception handler calls it; the handlers for FastAPI's own exceptions (validation, unknown route,
a bug) only turn those into a RequestError first.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (the body
# models) at run time, and string annotations of closures would not resolve.
import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from retro_ray import config as C
from retro_ray.serve.config import ServeConfig
from retro_ray.serve.errors import REPLICA_DIED_CODE, RequestError, error_body, from_deployment_failure
from retro_ray.serve.generator import RowFailed
from retro_ray.serve.schemas import (
    CompletionRequest,
    CompletionResponse,
    DocumentsRequest,
    DocumentsResponse,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    ModelCard,
    ModelList,
)

log = logging.getLogger("retro_ray.serve")

# A prompt longer than this many characters per allowed token is refused before it is tokenized
# (no BPE token of a real tokenizer is that long), so a megabyte body never reaches the tokenizer.
MAX_CHARS_PER_TOKEN = 64
HEALTH_TIMEOUT_S = 10.0
OPEN_PATHS = ("/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")
ERRORS = {s: {"description": d, "content": {"application/json": {"example": error_body(d)}}}
          for s, d in ((400, "Invalid request"), (401, "Missing or wrong bearer token"), (404, "Unknown model"),
                       (503, "Generator unavailable"))}


def hash_token(token: str | None) -> str | None:
    """The sha256 hex digest the ingress compares tokens by (None for no token)."""
    return hashlib.sha256(token.encode()).hexdigest() if token else None


# --------------------------------------------------------------------------------------------------
# Errors → HTTP
# --------------------------------------------------------------------------------------------------


def error_response(err: RequestError, headers: dict | None = None) -> JSONResponse:
    """A RequestError as HTTP: its status and OpenAI's error body."""
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def validation_error(exc: RequestValidationError) -> RequestError:
    """One line naming the field and the problem, from pydantic's list of errors."""
    # A misspelt field name explains the "missing" error it causes, so it is named first.
    errors = sorted(exc.errors(), key=lambda err: err.get("type") != "extra_forbidden")
    if not errors:
        return RequestError("invalid request", code="invalid_request")
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path"):
        loc = loc[1:]
    kind = e.get("type", "")
    where = ".".join(loc) or None

    def refused(message: str, param: str | None = where, code: str = "invalid_request") -> RequestError:
        return RequestError(message, code=code, param=param)

    if kind == "request_value":  # the schemas' own checks: the message names the field and the fix
        return refused(str(e.get("msg")), code=e.get("ctx", {}).get("code", "invalid_value"))
    if kind == "json_invalid":
        return refused(f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))}); "
                       "send a JSON object", None)
    if kind == "missing" and not loc:
        return refused("the request body is missing; send a JSON object (Content-Type: application/json)", None)
    if kind in ("model_attributes_type", "dict_type", "model_type") and not loc:
        return refused("the request body must be a JSON object", None)
    if kind == "extra_forbidden":
        return refused(f"unknown field '{where}'; see /docs for the accepted fields")
    if kind == "missing":
        return refused(f"'{where}' is required")
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    if loc and kind not in ("value_error", "assertion_error"):
        got = json.dumps(e.get("input"), default=str)
        msg = f"{msg} (got {got[:60]})"
    return refused(f"{where}: {msg}" if where else msg)


# --------------------------------------------------------------------------------------------------
# Middleware
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthState:
    """What BearerAuth checks against, kept on the app as ``app.state.auth``."""

    digest: str | None   # sha256 of the token; None = no token, every path is open
    env: str             # the variable the token is read from (the 401 message names it)


class BearerAuth:
    """ASGI middleware: every path but /health and the docs needs ``Authorization: Bearer <token>``
    when the app's ``state.auth`` holds a token. It runs before the body is read, so an
    unauthenticated client learns nothing about its request's validity."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        auth: AuthState | None = getattr(scope["app"].state, "auth", None) if "app" in scope else None
        if scope["type"] != "http" or auth is None or auth.digest is None:
            return await self.app(scope, receive, send)
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path.rstrip("/") in OPEN_PATHS or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(hash_token(token.strip()) or "", auth.digest):
            why = "missing" if not header else "wrong"
            err = RequestError(f"{why} bearer token: send the header 'Authorization: Bearer <token>' with the token "
                               f"this server was given in ${auth.env}", 401, "invalid_api_key", type_="authentication_error")
            return await error_response(err, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        return await self.app(scope, receive, send)


class JsonBodies:
    """ASGI middleware: every POST body is read as JSON, whatever its Content-Type says, so that
    ``curl -d '{...}'`` (form-encoded by default) works as it does with NeMo's server."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        return await self.app(scope, receive, send)


# --------------------------------------------------------------------------------------------------
# The deployment
# --------------------------------------------------------------------------------------------------


def _openai_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


@serve.deployment(name="RetroIngress")
@serve.ingress()
class RetroIngress:
    def __init__(self, generator, cfg: dict, token_digest: str | None = None) -> None:
        self.generator = generator
        self.cfg: ServeConfig = C.build(ServeConfig, cfg)
        # The token: given by the builder (as a digest, so no secret sits in the application config), or
        # found in this replica's own environment (a Kubernetes secret, a runtime_env env_var).
        env = self.cfg.auth_token_env
        self.auth = AuthState(token_digest or hash_token(os.environ.get(env)), env)
        self._model: str | None = None
        self._created = int(time.time())
        # Generator calls whose replica died under them: made again (and answered), or still failed after that.
        self.stats = {"replica_died_retried": 0, "replica_died_failed": 0}

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self)

    # ---- helpers ------------------------------------------------------------------------------------

    async def _ask(self, response, again=None):
        """The result of a generator call; its failure as the RequestError it means for the client.

        ``again`` (a function that makes the same call anew) is called once when the replica serving
        the call died under it (killed, its node lost): the callers pass it only for calls that are safe
        to repeat (a generation has no side effect; adding documents is idempotent, stages/add_docs.py).
        The handle's router drops a replica that failed a call this way, so the repeat goes to a live one. A
        call that fails again, or has no ``again``, is a 503 ``replica_died`` the client may retry.
        """
        try:
            return await response
        except Exception as e:  # noqa: BLE001 -- every failure has a meaning for the client (errors.py)
            err = from_deployment_failure(e)
        if err.code == REPLICA_DIED_CODE and again is not None:
            log.warning("a generator replica died under a call; making it once more")
            try:
                result = await again()
            except Exception as e:  # noqa: BLE001 -- as above
                err = from_deployment_failure(e)
            else:
                self.stats["replica_died_retried"] += 1
                return result
        if err.code == REPLICA_DIED_CODE:
            self.stats["replica_died_failed"] += 1
        raise err

    async def _model_name(self) -> str:
        if self._model is None:
            self._model = (await self._ask(self.generator.info.remote(), self.generator.info.remote))["model"]
        return self._model

    def _check_limits(self, body: GenerateRequest | CompletionRequest) -> None:
        """This server's limits on a request; a prompt's length in tokens is the generator's to check."""
        cfg, prompts = self.cfg, body.all_prompts()
        if len(prompts) > cfg.max_prompts_per_request:
            raise RequestError(f"{len(prompts)} prompts in one request; the limit is {cfg.max_prompts_per_request}: "
                               "split the request", param="prompts")
        field, tokens = body.tokens_requested()
        if tokens > cfg.max_tokens_to_generate:
            raise RequestError(f"{field}={tokens} is over this server's limit of {cfg.max_tokens_to_generate}; "
                               "ask for fewer tokens", param=field)
        for i, p in enumerate(prompts):
            if len(p) > cfg.max_prompt_tokens * MAX_CHARS_PER_TOKEN:
                raise RequestError(f"prompt {i} is {len(p):,} characters, far over this server's limit of "
                                   f"{cfg.max_prompt_tokens} tokens; shorten it", code="context_length_exceeded",
                                   param="prompt")

    @staticmethod
    def _specs(body: GenerateRequest | CompletionRequest) -> list[dict]:
        """One spec per prompt for the generator: the prompt, its neighbours and the settings."""
        settings, prompts, neighbors = body.settings(), body.all_prompts(), body.neighbors
        per_prompt = bool(neighbors) and isinstance(neighbors[0], list)
        return [{**settings, "prompt": p, "neighbors": neighbors[i] if per_prompt else neighbors}
                for i, p in enumerate(prompts)]

    # ---- endpoints ----------------------------------------------------------------------------------

    async def health(self) -> dict:
        try:
            info = await asyncio.wait_for(self.generator.info.remote(), HEALTH_TIMEOUT_S)
        except Exception:  # noqa: BLE001 -- any failure to answer is "not healthy"
            raise RequestError("the generator did not answer", 503, "unavailable") from None
        return {"status": "ok", "model": info["model"], "generator": info, "ingress": dict(self.stats)}

    async def generate(self, body: GenerateRequest) -> dict:
        self._check_limits(body)
        specs = self._specs(body)
        return await self._ask(self.generator.generate.remote(specs), lambda: self.generator.generate.remote(specs))

    async def models(self) -> dict:
        return {"object": "list", "data": [ModelCard(id=await self._model_name(), created=self._created).model_dump()]}

    async def model(self, model: str) -> dict:
        name = await self._model_name()
        if model != name:
            raise RequestError(f"model '{model}' is not served here; this server serves '{name}'", 404, "model_not_found")
        return ModelCard(id=name, created=self._created).model_dump()

    async def completions(self, body: CompletionRequest):
        name = await self._model_name()
        if body.model != name:
            raise RequestError(f"model '{body.model}' is not served here; this server serves '{name}' (GET /v1/models)",
                               404, "model_not_found", "model")
        self._check_limits(body)
        specs = self._specs(body)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream_completion(specs, cid, created, name, include_usage)
        gens = (await self._ask(self.generator.generate.remote(specs),
                                lambda: self.generator.generate.remote(specs)))["generations"]
        usage = {"prompt_tokens": sum(g["prompt_tokens"] for g in gens), "completion_tokens": sum(len(g["tokens"]) for g in gens)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": cid, "object": "text_completion", "created": created, "model": name, "usage": usage,
                "choices": [{"text": g["text"], "index": i, "logprobs": None, "finish_reason": _openai_reason(g["finish_reason"])}
                            for i, g in enumerate(gens)]}

    async def _stream_completion(self, specs, cid: str, created: int, name: str, include_usage: bool):
        stream = self.generator.options(stream=True).stream.remote(specs)
        await self._ask(stream.__anext__())  # Accepted, or the RequestError that refused a prompt

        def chunk(index: int, text: str, reason: str | None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": reason}]}

        async def events():
            usage = {"prompt_tokens": 0, "completion_tokens": 0}
            finished = False
            try:
                async for ev in stream:
                    if isinstance(ev, RowFailed):
                        yield _sse({"index": ev.index, **ev.error.body()})
                        continue
                    gen = ev.generation
                    if ev.finished and gen is not None:
                        usage["prompt_tokens"] += gen["prompt_tokens"]
                        usage["completion_tokens"] += len(gen["tokens"])
                        yield _sse(chunk(ev.index, ev.text, _openai_reason(gen["finish_reason"])))
                    elif ev.text:
                        yield _sse(chunk(ev.index, ev.text, None))
                if include_usage:
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    yield _sse({"id": cid, "object": "text_completion", "created": created, "model": name,
                                "choices": [], "usage": usage})
                yield "data: [DONE]\n\n"
                finished = True
            except Exception as e:  # noqa: BLE001 -- the generator failed mid-stream (its replica died): the last event says so
                yield _sse(from_deployment_failure(e).body())
            finally:
                if not finished:  # the client disconnected: stop the decode rows it held
                    stream.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def documents(self, body: DocumentsRequest) -> dict:
        records = [d.model_dump() for d in body.documents]
        return await self._ask(self.generator.add_documents.remote(records),
                               lambda: self.generator.add_documents.remote(records))


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------


def create_app(ingress: RetroIngress) -> FastAPI:
    """The FastAPI app of one ingress replica: its routes call ``ingress``; its auth is ``ingress.auth``."""
    app = FastAPI(
        title="retro-ray",
        version="0.1.0",
        description="RETRO generation with retrieval (Borgeaud et al. 2022) on Ray Serve. NeMo-style `/generate`, "
                    "OpenAI-style `/v1/completions` (with `stream=true`), knowledge update through `/documents`.",
    )
    app.state.auth = ingress.auth
    app.add_middleware(BearerAuth)
    app.add_middleware(JsonBodies)
    # Declared so /docs shows an Authorize button; the check itself is BearerAuth.
    bearer = [Depends(HTTPBearer(auto_error=False,
                                 description="Needed when the server's token variable (auth_token_env) is set."))]

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no endpoint {request.url.path}; see /docs", 405: f"{request.method} is not allowed on {request.url.path}"}
        err = RequestError(message.get(exc.status_code, str(exc.detail)), exc.status_code,
                           type_="not_found_error" if exc.status_code == 404 else "invalid_request_error")
        return error_response(err, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(RequestError(f"internal error ({type(exc).__name__}); see the server log", 500))

    @app.get("/health", response_model=HealthResponse, summary="Liveness and the generator's counters (no auth)",
             responses={503: ERRORS[503]})
    async def health():
        return await ingress.health()

    @app.post("/generate", response_model=GenerateResponse, responses={k: ERRORS[k] for k in (400, 401, 503)},
              dependencies=bearer, summary="Generate with RETRO (NeMo inference settings)")
    async def generate(body: GenerateRequest):
        return await ingress.generate(body)

    @app.get("/v1/models", response_model=ModelList, dependencies=bearer, summary="The served model (OpenAI)")
    async def models():
        return await ingress.models()

    @app.get("/v1/models/{model}", response_model=ModelCard, dependencies=bearer,
             responses={404: ERRORS[404]}, summary="One model (OpenAI)")
    async def model(model: str):
        return await ingress.model(model)

    @app.post("/v1/completions", response_model=CompletionResponse, dependencies=bearer,
              responses={k: ERRORS[k] for k in (400, 401, 404, 503)},
              summary="OpenAI completions; stream=true answers with server-sent events")
    async def completions(body: CompletionRequest):
        return await ingress.completions(body)

    @app.post("/documents", response_model=DocumentsResponse, dependencies=bearer,
              responses={k: ERRORS[k] for k in (400, 401, 503)},
              summary="Add documents to the retrieval database (knowledge update)")
    async def documents(body: DocumentsRequest):
        return await ingress.documents(body)

    return app
