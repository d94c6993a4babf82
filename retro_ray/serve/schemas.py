"""Request and response bodies of the HTTP service (pydantic: they validate input and make /docs).

Two request styles:

- ``POST /generate`` -- NeMo's RETRO inference settings by name (tokens_to_generate, greedy, top_k,
  top_p, ..., retro_num_neighbors), one ``prompt`` or several ``prompts``, optional ``neighbors``
  (the NeMo way of giving the retrieved text with the request). The answer carries, per prompt, the
  text, the token ids and every retrieval made while generating (document id, title, text).
- ``POST /v1/completions`` -- the OpenAI completions schema, so OpenAI clients work unchanged;
  RETRO-only settings ride along as extra fields (the ``extra_body`` of the openai client).

This module owns what a valid request is: types (strict: ``"5"`` is not an integer and ``1`` is not
a bool), the range of every sampling setting, the OpenAI fields that are refused, and the mapping of
a request to the generator's settings (``settings()``). Its own checks raise a ``request_value``
error whose message names the field and the fix; the ingress shows it as it is. What depends on the
server's configuration (its limits) is checked by the ingress; what needs the tokenizer (a prompt's
length in tokens), by the generator.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

STRICT = ConfigDict(extra="forbid", strict=True)
# The generator's default when /generate leaves tokens_to_generate out (InferenceConfig's, NeMo's).
DEFAULT_TOKENS_TO_GENERATE = 30
# OpenAI's default max_tokens.
DEFAULT_MAX_TOKENS = 16
# torch.Generator.manual_seed takes a 64-bit integer, signed or not.
SEED_RANGE = (-(2**63), 2**64 - 1)
# Fields of /generate that go to InferenceConfig / RetroInferenceSettings by the same name.
INFERENCE_KEYS = ("tokens_to_generate", "greedy", "temperature", "top_k", "top_p", "add_BOS",
                  "min_tokens_to_generate", "end_strings", "seed")
RETRO_KEYS = ("retro_num_neighbors", "retrieve")


# OpenAI completion options this server does not implement: the values that mean "off", and the
# answer to any other value.
UNSUPPORTED = {
    "n": ((None, 1), "n={v} is not supported; this server returns one completion per prompt (n=1)"),
    "best_of": ((None, 1), "best_of={v} is not supported; use best_of=1"),
    "echo": ((None, False), "echo=true is not supported; leave echo out (or false)"),
    "logprobs": ((None,), "logprobs are not supported; leave logprobs out"),
    "presence_penalty": ((None, 0), "presence_penalty={v} is not supported; leave it at 0"),
    "frequency_penalty": ((None, 0), "frequency_penalty={v} is not supported; leave it at 0"),
    "logit_bias": ((None, {}), "logit_bias is not supported; leave it out"),
    "suffix": ((None, ""), "suffix is not supported; leave it out"),
}


def refuse(message: str, code: str = "invalid_value") -> PydanticCustomError:
    """A validation error whose message is shown as it is (it names the field and the fix)."""
    return PydanticCustomError("request_value", "{message}", {"message": message, "code": code})


def _str_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise refuse(f"{name} must be a list of strings")
    if any(v == "" for v in value):
        raise refuse(f"{name} holds an empty string; give non-empty strings")
    return value


def _neighbors(value: Any) -> list[str] | list[list[str]] | None:
    if value is None:
        return None
    shape = "neighbors must be a list of strings (or one list of strings per prompt)"
    if not isinstance(value, list):
        raise refuse(shape)
    if all(isinstance(v, str) for v in value):
        return value
    if all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in value):
        return value
    raise refuse(shape)


def _at_least(name: str, value: int | None, low: int, why: str) -> int | None:
    if value is not None and value < low:
        raise refuse(f"{name}={value!r}: must be a whole number ≥ {low}{why}")
    return value


def _tokens(name: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise refuse(f"{name}={value}; ask for at least 1 token")
    return value


def _top_p(value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise refuse(f"top_p={value!r}: must be in (0, 1] (1 = off)")
    return value


def _seed(value: int | None) -> int | None:
    if value is not None and not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise refuse(f"seed={value} is out of range; give a whole number from -2**63 to 2**64-1")
    return value


def _check_prompt_neighbors(neighbors, prompts: list[str]) -> None:
    if neighbors and isinstance(neighbors[0], list) and len(neighbors) != len(prompts):
        raise ValueError(f"neighbors has {len(neighbors)} lists for {len(prompts)} prompts; "
                         "give one list per prompt, or one list of strings for all")


# --------------------------------------------------------------------------------------------------
# /generate
# --------------------------------------------------------------------------------------------------


class RetroSettings(BaseModel):
    """Settings shared by /generate and the RETRO extensions of /v1/completions.

    Empty (null or left out) = the generator's default (retro_ray.serve.generate.InferenceConfig)."""

    model_config = STRICT

    neighbors: Any = Field(
        default=None,
        validation_alias=AliasChoices("neighbors", "neighbours"),
        description="Neighbour texts to condition on instead of retrieving (NeMo's `neighbors`): a list of strings "
                    "for every prompt, or one list per prompt.",
        json_schema_extra={"anyOf": [{"type": "array", "items": {"type": "string"}},
                                     {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
                                     {"type": "null"}]},
    )
    retro_num_neighbors: int | None = Field(default=None, description="Neighbours per chunk fed to the model (≥ 1).")
    retrieve: bool | None = Field(
        default=None, description="Retrieve neighbours at every chunk boundary while generating (when none are given)."
    )
    top_k: int | None = Field(default=None, description="Sample from the k most likely tokens; 0 = off.")
    min_tokens_to_generate: int | None = Field(default=None, description="Do not stop before this many tokens.")
    add_BOS: bool | None = Field(default=None, description="Prepend the end-of-document token (a document start, as in training).")

    @field_validator("neighbors", mode="before")
    @classmethod
    def _check_neighbors(cls, v):
        return _neighbors(v)

    @field_validator("retro_num_neighbors")
    @classmethod
    def _check_retro_num_neighbors(cls, v):
        return _at_least("retro_num_neighbors", v, 1, "")

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, v):
        return _at_least("top_k", v, 0, " (0 = no limit)")

    @field_validator("min_tokens_to_generate")
    @classmethod
    def _check_min_tokens(cls, v):
        return _at_least("min_tokens_to_generate", v, 0, "")

    # Both requests have top_p, seed and a token count (with their own names and defaults); the ranges
    # are checked once, here.
    @field_validator("tokens_to_generate", "max_tokens", check_fields=False)
    @classmethod
    def _check_tokens(cls, v, info: ValidationInfo):
        return _tokens(info.field_name, v)

    @field_validator("top_p", check_fields=False)
    @classmethod
    def _check_top_p(cls, v):
        return _top_p(v)

    @field_validator("seed", check_fields=False)
    @classmethod
    def _check_seed(cls, v):
        return _seed(v)

    def retro_settings(self) -> dict:
        return {k: getattr(self, k) for k in ("top_k", "min_tokens_to_generate", "add_BOS", *RETRO_KEYS)}


class GenerateRequest(RetroSettings):
    """NeMo-style RETRO generation. Give `prompt` or `prompts`."""

    prompt: str | None = Field(default=None, description="The text to continue.")
    prompts: list[str] | None = Field(default=None, description="Several texts to continue in one batch.")
    tokens_to_generate: int | None = Field(default=None, description="Tokens to generate (NeMo's default: 30).")
    greedy: bool | None = Field(default=None, description="Argmax decoding instead of sampling.")
    temperature: float | None = Field(default=None, description="Sampling temperature (> 0).")
    top_p: float | None = Field(default=None, description="Nucleus sampling threshold in (0, 1]; 1 = off.")
    end_strings: list[str] | None = Field(default=None, description="Stop when the text contains one of these (cut off there).")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")

    model_config = ConfigDict(
        extra="forbid", strict=True,
        json_schema_extra={"examples": [{"prompt": "The Moon is", "tokens_to_generate": 32, "greedy": True}]},
    )

    @field_validator("end_strings", mode="before")
    @classmethod
    def _check_end_strings(cls, v):
        return None if v is None else _str_list(v, "end_strings")

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, v):
        if v is not None and not v > 0:
            raise refuse(f"temperature={v!r}: must be > 0 (use greedy=true for argmax decoding)")
        return v


    @model_validator(mode="after")
    def _one_kind_of_prompt(self):
        if self.prompt is None and self.prompts is None:
            raise ValueError("give `prompt` (a string) or `prompts` (a list of strings)")
        if self.prompt is not None and self.prompts is not None:
            raise ValueError("give `prompt` or `prompts`, not both")
        if self.prompts is not None and not self.prompts:
            raise ValueError("`prompts` is empty; give at least one prompt")
        if any(p == "" for p in self.all_prompts()):
            raise ValueError("a prompt is empty; give some text to continue")
        _check_prompt_neighbors(self.neighbors, self.all_prompts())
        return self

    def all_prompts(self) -> list[str]:
        return [self.prompt] if self.prompt is not None else list(self.prompts or [])

    def tokens_requested(self) -> tuple[str, int]:
        """The field that asks for tokens, and how many it asks for (the default when left out)."""
        n = self.tokens_to_generate
        return "tokens_to_generate", n if n is not None else DEFAULT_TOKENS_TO_GENERATE

    def settings(self) -> dict:
        """The generator's settings by InferenceConfig name (None = its default)."""
        return {**{k: getattr(self, k) for k in INFERENCE_KEYS}, **self.retro_settings()}


class NeighborOut(BaseModel):
    chunk_id: int = Field(description="Chunk id in the retrieval database; -1 for neighbours given with the request.")
    doc_id: int = Field(description="Document id (row of data/docs.parquet); -1 for given neighbours.")
    title: str
    text: str
    distance: float | None = Field(default=None, description="Index distance (None for given neighbours).")


class RetrievalOut(BaseModel):
    position: int = Field(description="First generated-sequence token that is conditioned on these neighbours.")
    query: str = Field(description="The chunk of text that was searched for.")
    neighbors: list[NeighborOut]


class GenerationOut(BaseModel):
    prompt: str
    text: str = Field(description="The generated continuation (without the prompt).")
    tokens: list[int] = Field(description="Token ids of the continuation.")
    prompt_tokens: int
    finish_reason: str = Field(description="length | stop | eod | cancelled")
    retrievals: list[RetrievalOut] = Field(description="The neighbours used while generating, in order.")


class GenerateResponse(BaseModel):
    model: str
    generations: list[GenerationOut]


# --------------------------------------------------------------------------------------------------
# /v1/completions (OpenAI)
# --------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool | None = None


class CompletionRequest(RetroSettings):
    """OpenAI completions.

    Supported as OpenAI defines them: ``max_tokens``, ``temperature`` (0 = greedy), ``top_p``,
    ``stop`` (the completion ends before the first stop string; it is not returned, nor streamed),
    ``seed`` (same seed, same settings, same prompt: the same completion), ``stream`` and
    ``stream_options.include_usage``. ``user`` (the caller's end-user id, for OpenAI's abuse
    monitoring) is accepted and not used. Options this server does not implement are refused with a
    400 naming them unless they have their neutral value: ``n`` and ``best_of`` (1), ``echo``
    (false), ``logprobs`` (null), ``presence_penalty`` and ``frequency_penalty`` (0), ``suffix``
    (empty), ``logit_bias`` (empty).
    """

    model: str = Field(description="The served model name (GET /v1/models).")
    prompt: Any = Field(description="A string or a list of strings.", json_schema_extra={
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]})
    max_tokens: int | None = Field(default=DEFAULT_MAX_TOKENS, description="Tokens to generate (≥ 1).")
    temperature: float | None = Field(default=1.0, description="≥ 0; 0 = greedy.")
    top_p: float | None = Field(default=1.0, description="Nucleus sampling threshold in (0, 1]; 1 = off.")
    n: int | None = Field(default=1, description="Only 1 is supported.")
    stop: Any = Field(default=None, description="A string or a list of strings that ends the completion (not included in it).",
                      json_schema_extra={"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                                                   {"type": "null"}]})
    stream: bool | None = Field(default=False, description="Server-sent events, one per decode step, then [DONE].")
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    user: str | None = Field(default=None, description="The caller's end-user id (OpenAI: for abuse monitoring); "
                                                       "accepted and not used.")
    # OpenAI options that only have their neutral value here; anything else is refused (400), not ignored.
    echo: bool | None = Field(default=None, description="Not supported: only false.")
    logprobs: int | None = Field(default=None, description="Not supported: only null.")
    best_of: int | None = Field(default=None, description="Only 1 is supported.")
    presence_penalty: float | None = Field(default=None, description="Not supported: only 0.")
    frequency_penalty: float | None = Field(default=None, description="Not supported: only 0.")
    logit_bias: dict[str, float] | None = Field(default=None, description="Not supported: only empty.")
    suffix: str | None = Field(default=None, description="Not supported: only empty.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v):
        if isinstance(v, str):
            v = [v]
        elif not (isinstance(v, list) and all(isinstance(p, str) for p in v)):
            raise refuse("prompt must be a string or a list of strings (token-id prompts are not supported)")
        if not v:
            raise refuse("prompt is an empty list; give at least one prompt")
        if any(p == "" for p in v):
            raise refuse("a prompt is empty; give some text to continue")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v):
        if v is None:
            return []
        return _str_list([v] if isinstance(v, str) else v, "stop")

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, v):
        if v is not None and not v >= 0:
            raise refuse(f"temperature={v!r}: must be ≥ 0 (0 = greedy decoding)")
        return v


    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v, info: ValidationInfo):
        neutral, message = UNSUPPORTED[info.field_name]
        if v not in neutral:
            raise refuse(message.format(v=repr(v)), "unsupported_parameter")
        return v

    @model_validator(mode="after")
    def _neighbors_per_prompt(self):
        _check_prompt_neighbors(self.neighbors, self.prompt)
        return self

    def all_prompts(self) -> list[str]:
        return list(self.prompt)

    def tokens_requested(self) -> tuple[str, int]:
        """The field that asks for tokens, and how many it asks for (the default when null)."""
        return "max_tokens", self.max_tokens if self.max_tokens is not None else DEFAULT_MAX_TOKENS

    def settings(self) -> dict:
        """The generator's settings by InferenceConfig name: OpenAI's names and defaults mapped to NeMo's."""
        out = {"tokens_to_generate": self.tokens_requested()[1], "end_strings": self.stop or None, "seed": self.seed,
               "top_p": self.top_p, **self.retro_settings()}
        if self.temperature is not None and self.temperature == 0:  # OpenAI's temperature 0 means argmax
            out["greedy"] = True
        else:
            out["temperature"] = self.temperature
        return out


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "retro-ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --------------------------------------------------------------------------------------------------
# /documents, /health
# --------------------------------------------------------------------------------------------------


class DocumentIn(BaseModel):
    model_config = STRICT
    title: str = ""
    text: str

    @field_validator("text")
    @classmethod
    def _not_empty(cls, v):
        if not v.strip():
            raise ValueError("a document's text is empty")
        return v


class DocumentsRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True,
        json_schema_extra={"examples": [{"documents": [{"title": "Zorblax", "text": "Zorblax is a fictional moon ..."}]}]},
    )
    documents: list[DocumentIn] = Field(description="Documents to add to the retrieval database.")

    @field_validator("documents")
    @classmethod
    def _some(cls, v):
        if not v:
            raise ValueError("documents is empty; give at least one {title, text}")
        return v


class DocumentsResponse(BaseModel):
    added: int = Field(description="Documents added.")
    report: dict = Field(description="The add-documents stage report (counts, timings, outputs).")


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: str
    generator: dict = Field(description="The answering generator replica's counters.")
    ingress: dict = Field(default_factory=dict, description="The ingress replica's counters: generator calls whose "
                          "replica died under them, made again (replica_died_retried) or answered 503 (replica_died_failed).")
