"""Request and response bodies of the HTTP service (pydantic: they validate input and make /docs).

Two request styles:

- ``POST /generate`` -- NeMo's RETRO inference settings by name (tokens_to_generate, greedy, top_k,
  top_p, ..., retro_num_neighbors), one ``prompt`` or several ``prompts``, optional ``neighbors``
  (the NeMo way of giving the retrieved text with the request). The answer carries, per prompt, the
  text, the token ids and every retrieval made while generating (document id, title, text).
- ``POST /v1/completions`` -- the OpenAI completions schema, so OpenAI clients work unchanged;
  RETRO-only settings ride along as extra fields (the ``extra_body`` of the openai client).

Types are strict: ``"5"`` is not an integer and ``1`` is not a bool. Unions a person gets wrong
(prompt, neighbours, stop) are checked by hand so the error names the field and the expected shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

STRICT = ConfigDict(extra="forbid", strict=True)


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None, param: str | None = None) -> dict:
    """The JSON of every error answer (OpenAI's shape)."""
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def _str_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of strings")
    return value


def _neighbors(value: Any) -> list[str] | list[list[str]] | None:
    if value is None:
        return None
    shape = "neighbors must be a list of strings (or one list of strings per prompt)"
    if not isinstance(value, list):
        raise ValueError(shape)
    if all(isinstance(v, str) for v in value):
        return value
    if all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in value):
        return value
    raise ValueError(shape)


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
    retro_num_neighbors: int | None = Field(default=None, description="Neighbours per chunk fed to the model.")
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


class GenerateRequest(RetroSettings):
    """NeMo-style RETRO generation. Give `prompt` or `prompts`."""

    prompt: str | None = Field(default=None, description="The text to continue.")
    prompts: list[str] | None = Field(default=None, description="Several texts to continue in one batch.")
    tokens_to_generate: int | None = Field(default=None, description="Tokens to generate (NeMo's default: 30).")
    greedy: bool | None = Field(default=None, description="Argmax decoding instead of sampling.")
    temperature: float | None = Field(default=None, description="Sampling temperature.")
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
        if self.neighbors and isinstance(self.neighbors[0], list) and len(self.neighbors) != len(self.all_prompts()):
            raise ValueError(f"neighbors has {len(self.neighbors)} lists for {len(self.all_prompts())} prompts; "
                             "give one list per prompt, or one list of strings for all")
        return self

    def all_prompts(self) -> list[str]:
        return [self.prompt] if self.prompt is not None else list(self.prompts or [])


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
    """OpenAI completions. Unsupported OpenAI options are accepted only at their default values."""

    model: str = Field(description="The served model name (GET /v1/models).")
    prompt: Any = Field(description="A string or a list of strings.", json_schema_extra={
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]})
    max_tokens: int | None = Field(default=16, description="Tokens to generate.")
    temperature: float | None = Field(default=1.0, description="0 = greedy.")
    top_p: float | None = Field(default=1.0)
    n: int | None = Field(default=1, description="Only 1 is supported.")
    stop: Any = Field(default=None, description="A string or a list of strings that ends the completion.",
                      json_schema_extra={"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                                                   {"type": "null"}]})
    stream: bool | None = Field(default=False, description="Server-sent events, one per decode step, then [DONE].")
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    # OpenAI options that only have their default here; anything else is refused (400), not ignored.
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v):
        if isinstance(v, str):
            v = [v]
        elif not (isinstance(v, list) and all(isinstance(p, str) for p in v)):
            raise ValueError("prompt must be a string or a list of strings (token-id prompts are not supported)")
        if not v:
            raise ValueError("prompt is an empty list; give at least one prompt")
        if any(p == "" for p in v):
            raise ValueError("a prompt is empty; give some text to continue")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        return _str_list(v, "stop")

    @model_validator(mode="after")
    def _unsupported(self):
        if self.n not in (None, 1):
            raise ValueError(f"n={self.n} is not supported; this server returns one completion per prompt (n=1)")
        if self.best_of not in (None, 1):
            raise ValueError(f"best_of={self.best_of} is not supported; use best_of=1")
        if self.echo:
            raise ValueError("echo=true is not supported")
        if self.logprobs is not None:
            raise ValueError("logprobs are not supported; leave logprobs out")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported; leave it at 0")
        if self.neighbors and isinstance(self.neighbors[0], list) and len(self.neighbors) != len(self.prompt):
            raise ValueError(f"neighbors has {len(self.neighbors)} lists for {len(self.prompt)} prompts; "
                             "give one list per prompt, or one list of strings for all")
        return self


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
