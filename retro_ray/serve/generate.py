"""Text generation with RETRO: a KV cache for self-attention, neighbours encoded once per chunk.

This module schedules; the model computes. Every forward pass is ``RetroModel.forward`` against the
model's own ``RetroCache`` (model/retro.py): here are the batch, the neighbour events and their
retrieval, sampling and streaming, and no layer math.

Incremental decoding, for a batch of prompts of different lengths:

* Prefill runs each prompt through the model once (one sequence at a time, through a one-row view
  of the batch's cache, so positions and chunk boundaries are the prompt's own). Then every decode
  step feeds one token per sequence at its own position (``positions=lengths``).
* Neighbours are *events*: at position p a new neighbour set becomes visible to p and every later
  position until the next event. The generator adds each set to the cache (``add_neighbors``)
  before the forward that feeds p; that forward encodes it once, conditioned on the first CCA
  layer's normed states of the (up to m) tokens ending at p, and every CCA layer projects the
  encoded neighbours to keys/values once, then reuses them for each token that reads that set.
* Where events happen:
    - neighbours given in the request (NeMo's semantics: they are the prompt's neighbours): one
      event at the prompt's last token; every generated token reads them.
    - retrieved (the paper's semantics): at every completed chunk, p = (j+1)·m − 1, with that
      chunk's text as the query (exactly the training-time visibility, see model/retro.py CCA),
      plus one event at the prompt's last token with its trailing partial chunk as the query, so a
      short prompt gets neighbours from its first generated token rather than after m tokens.
    - no retriever and no neighbours, or a GPT model: no events; CCA adds nothing.
* ``recompute=True`` runs the whole sequence from scratch for every token with the same events
  (a fresh cache each time, nothing carried over): the reference the cache is tested against, and
  the benchmark's baseline.

Sampling (NeMo's ``inference`` names): greedy, temperature, top_k, top_p, min_tokens_to_generate,
end_strings, add_BOS (the end-of-document token, which GPT training uses as the separator), seed.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retro_ray.config import config_class
from retro_ray.errors import RetroRayError
from retro_ray.metrics import stage_metrics
from retro_ray.model.retro import RetroCache, RetroModel

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Settings, requests, results
# --------------------------------------------------------------------------------------------------


@config_class
class RetroInferenceSettings:
    """NeMo's ``inference.retro_inference`` block."""

    retro_num_neighbors: int = field(default=2, metadata={"help": "Neighbours retrieved (or used, when given) per chunk."})
    retrieve: bool = field(
        default=True,
        metadata={"help": "Retrieve neighbours at the prompt end and every chunk boundary when an index is loaded "
                          "and no neighbours are given; false = no retrieval."},
    )

    def __post_init__(self) -> None:
        if self.retro_num_neighbors < 1:
            raise RetroRayError(f"inference.retro_inference.retro_num_neighbors={self.retro_num_neighbors!r}: must be a "
                                "whole number ≥ 1.")


@config_class
class InferenceConfig:
    """Sampling settings; names follow NeMo's ``inference`` block."""

    tokens_to_generate: int = field(default=30, metadata={"help": "Tokens to generate at most."})
    greedy: bool = field(default=False, metadata={"help": "Take the most likely token (ignores temperature/top_k/top_p)."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature (> 0); lower is more conservative."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens; 0 = no limit."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling: smallest set of tokens with this much probability; 1 = off."})
    add_BOS: bool = field(default=False, metadata={"help": "Prepend the end-of-document token, as at a document start in training."})
    min_tokens_to_generate: int = field(default=0, metadata={"help": "The end-of-document token is banned until this many tokens."})
    end_strings: tuple[str, ...] = field(default=(), metadata={"help": "Stop when the generated text contains one (it is cut off)."})
    seed: int | None = field(default=None, metadata={"help": "Seed of this prompt's sampler; unset = random."})
    retro_inference: RetroInferenceSettings = field(default_factory=RetroInferenceSettings,
                                                    metadata={"help": "Retrieval during generation."})

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, want: str) -> RetroRayError:
            return RetroRayError(f"inference.{name}={value!r}: {want}.")

        if self.tokens_to_generate < 1:
            raise bad("tokens_to_generate", self.tokens_to_generate, "give a whole number of tokens ≥ 1")
        if not self.temperature > 0:
            raise bad("temperature", self.temperature, "must be > 0 (use greedy=true for argmax decoding)")
        if self.top_k < 0:
            raise bad("top_k", self.top_k, "must be a whole number ≥ 0 (0 = no limit)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "must be in (0, 1] (1 = off)")
        if self.min_tokens_to_generate < 0:
            raise bad("min_tokens_to_generate", self.min_tokens_to_generate, "must be a whole number ≥ 0")
        if not all(self.end_strings):
            raise bad("end_strings", self.end_strings, "must be non-empty strings")


@config_class
class GenerateConfig:
    """`retro-ray generate` settings (NeMo's megatron_retro_inference.yaml names)."""

    prompt: str = field(default="", metadata={"help": "The text to continue."})
    neighbors: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Neighbour texts for the prompt, as a list ['a','b'] (NeMo semantics: every generated "
                          "token reads them); unset = retrieve from --project-dir's index."},
    )
    inference: InferenceConfig = field(default_factory=InferenceConfig, metadata={"help": "Sampling settings."})

    def request(self) -> GenerationRequest:
        return GenerationRequest(self.prompt, list(self.neighbors) if self.neighbors is not None else None, self.inference)


@dataclass
class GenerationRequest:
    prompt: str
    neighbors: list[str] | None = None  # given neighbours (NeMo semantics); None = retrieve
    inference: InferenceConfig = field(default_factory=InferenceConfig)


@dataclass
class NeighborInfo:
    chunk_id: int      # row of the chunk database; -1 for a neighbour given in the request
    doc_id: int        # row of docs.parquet (or of the added documents); -1 when given
    title: str
    text: str
    distance: float | None


@dataclass
class RetrievalEvent:
    position: int      # first token position (0-based, prompt included) that reads these neighbours
    query: str         # the text they were retrieved for
    neighbors: list[NeighborInfo]


@dataclass
class Generation:
    prompt: str
    text: str                      # generated text only
    tokens: list[int]              # generated token ids (the end-of-document token left out)
    prompt_tokens: int             # tokens the prompt took, BOS included
    finish_reason: str             # "length" | "stop" | "eod" | "cancelled"
    retrievals: list[RetrievalEvent]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StreamEvent:
    index: int                     # which request of the batch
    text: str                      # new text since the previous event of this request (may be "")
    token: int | None
    finished: bool
    generation: Generation | None = None  # set on the finishing event


# --------------------------------------------------------------------------------------------------
# Internal state
# --------------------------------------------------------------------------------------------------


@dataclass
class _Row:
    index: int
    request: GenerationRequest
    ids: list[int]                 # prompt (with BOS) + generated, as fed
    n_prompt: int
    mode: str                      # "given" | "retrieve" | "none"
    given: tuple[torch.Tensor, list[NeighborInfo]] | None
    rng: torch.Generator
    generated: list[int] = field(default_factory=list)
    events: list[tuple[int, torch.Tensor, torch.Tensor, RetrievalEvent]] = field(default_factory=list)
    finished: bool = False
    finish_reason: str = ""
    final_text: str | None = None
    emitted: int = 0


class Generator:
    """Batched RETRO generation with a KV cache; see the module docstring."""

    def __init__(self, model: RetroModel, tokenizer, eod_id: int, retriever=None, device: str | torch.device = "cpu",
                 name: str = "retro") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eod_id = int(eod_id)
        self.retriever = retriever
        self.device = torch.device(device)
        self.name = name
        cfg = model.config
        self.m = cfg.chunk_length
        self.r = cfg.neighbor_length
        self.vocab = min(int(tokenizer.get_vocab_size()), cfg.vocab_size)
        if retriever is not None and getattr(retriever.db, "chunk_length", self.m) != self.m:
            raise RetroRayError(
                f"the model reads chunks of {self.m} tokens but the retrieval database holds chunks of "
                f"{retriever.db.chunk_length}; serve the model with the project it was trained on."
            )

    # ---- construction ----------------------------------------------------------------------------

    @classmethod
    def load(cls, checkpoint: str | Path, project_dir: str | Path | None = None, *, index: str = "local",
             device: str = "auto", retriever=None, name: str | None = None, dtype: str = "auto") -> Generator:
        """A Generator from ``model.pt`` (``retro-ray export``) and, optionally, the project to retrieve from.

        index: "local" (the merged index in this process), "sharded" (IndexShard actors; needs Ray),
        or "none" (no retrieval: neighbours only when a request gives them).
        """
        from retro_ray.project import Project
        from retro_ray.tokenizer import load_tokenizer
        from retro_ray.train.export import load_exported, read_export

        if index not in ("local", "sharded", "none"):
            raise RetroRayError(f"index={index!r}: choose local, sharded or none.")
        ckpt = Path(checkpoint).expanduser()
        if ckpt.is_dir():
            raise RetroRayError(f"{ckpt} is a directory; give the model.pt written by "
                                f"`retro-ray export --exp-dir {ckpt} --out model.pt`.")
        data = read_export(ckpt).get("data", {})
        project = Project(project_dir) if project_dir is not None else None
        if project is not None:
            project.read_config()  # a clear "not a retro-ray project"
            tok_path, derived = project.tokenizer_path, project.derived()
            eod = derived.get("eod_id", data.get("eod_id"))
        else:
            tok_path = Path(data.get("tokenizer_path", ""))
            eod = data.get("eod_id")
        if not str(tok_path) or not Path(tok_path).is_file():
            raise RetroRayError(f"no tokenizer for {ckpt} (recorded path {str(tok_path) or 'none'} does not exist); "
                                "give --project-dir of the project the model was trained on.")
        tokenizer = load_tokenizer(Path(tok_path))
        if eod is None:
            raise RetroRayError(f"{ckpt} records no end-of-document token id; give --project-dir.")
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        model = load_exported(ckpt, expected_vocab_size=tokenizer.get_vocab_size(), device=dev)
        if dtype == "bf16" or (dtype == "auto" and dev.startswith("cuda")):
            model = model.to(torch.bfloat16)
        if project is not None and data.get("chunk_length") not in (None, project.read_config().chunk_length):
            raise RetroRayError(f"{ckpt} was trained with chunk_length={data['chunk_length']} but {project.root} "
                                f"has chunk_length={project.read_config().chunk_length}; use the training project.")
        if retriever is None and project is not None and index != "none" and model.config.retro.enabled:
            from retro_ray.retrieval.retriever import Retriever

            retriever = Retriever.sharded(project) if index == "sharded" else Retriever.local(project)
        return cls(model, tokenizer, int(eod), retriever=retriever, device=dev, name=name or ckpt.stem)

    # ---- public API ------------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)

    def generate(self, requests: list[GenerationRequest], *, recompute: bool = False) -> list[Generation]:
        """Generate for every request (one batched decode); results in request order."""
        out: list[Generation | None] = [None] * len(requests)
        for events in self.stream(requests, recompute=recompute):
            for e in events:
                if e.finished:
                    out[e.index] = e.generation
        return [g for g in out if g is not None]

    def stream(self, requests: list[GenerationRequest], is_cancelled: Callable[[int], bool] | None = None,
               *, recompute: bool = False) -> Iterator[list[StreamEvent]]:
        """One list of StreamEvents per decode step, for the requests still running."""
        if not requests:
            return
        rows = [self._start_row(i, r) for i, r in enumerate(requests)]
        # Ray metrics (no-ops outside a Ray worker): per-request latency, batch tokens/s.
        metrics = stage_metrics("serve")
        t0, n_tokens = time.perf_counter(), 0
        for events in self._run(rows, is_cancelled, recompute):
            n_tokens += sum(e.token is not None for e in events)
            for e in events:
                if e.finished:
                    metrics.generate_latency_seconds(time.perf_counter() - t0)
            yield events
        elapsed = time.perf_counter() - t0
        if n_tokens and elapsed > 0:
            metrics.generate_tokens_per_second(n_tokens / elapsed)

    # ---- request setup ---------------------------------------------------------------------------

    def _start_row(self, index: int, req: GenerationRequest) -> _Row:
        cfg = req.inference
        if not isinstance(req.prompt, str):
            raise RetroRayError("prompt must be a string.")
        ids = self.tokenizer.encode(req.prompt).ids
        if cfg.add_BOS:
            ids = [self.eod_id, *ids]
        if not ids:
            raise RetroRayError("the prompt is empty; give some text, or set inference.add_BOS=true to start "
                                "from a document boundary.")
        retro = self.model.config.retro.enabled
        given = None
        if req.neighbors is not None:
            if not isinstance(req.neighbors, list | tuple) or any(not isinstance(n, str) for n in req.neighbors):
                raise RetroRayError("neighbors must be a list of strings.")
            if not retro:
                raise RetroRayError("this model is a GPT (retro.enabled=false): it cannot read neighbours; "
                                    "leave neighbors out.")
            texts = list(req.neighbors)[: cfg.retro_inference.retro_num_neighbors]
            given = (self._given_tokens(texts), [NeighborInfo(-1, -1, "", t, None) for t in texts]) if texts else None
        if not retro:
            mode = "none"
        elif given is not None:
            mode = "given"
        elif self.retriever is not None and cfg.retro_inference.retrieve and req.neighbors is None:
            mode = "retrieve"
        else:
            mode = "none"
        seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**63)
        rng = torch.Generator(device="cpu").manual_seed(int(seed))
        return _Row(index, req, list(ids), len(ids), mode, given, rng)

    def _given_tokens(self, texts: list[str]) -> torch.Tensor:
        """[K, r]: each neighbour text's tokens, cut to r and padded with the end-of-document token."""
        out = torch.full((len(texts), self.r), self.eod_id, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = self.tokenizer.encode(t).ids[: self.r]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    # ---- neighbours ------------------------------------------------------------------------------

    def _is_event(self, row: _Row, p: int) -> bool:
        if row.mode == "given":
            return p == row.n_prompt - 1
        if row.mode == "retrieve":
            return p == row.n_prompt - 1 or (p + 1) % self.m == 0
        return False

    def _fetch(self, wanted: list[tuple[_Row, int]]) -> list[tuple[torch.Tensor, torch.Tensor, RetrievalEvent]]:
        """Neighbour tokens [K, r], mask [K] and the event record for each (row, position)."""
        out: list[Any] = [None] * len(wanted)
        queries: dict[int, list[int]] = {}  # k → indices into wanted
        for i, (row, p) in enumerate(wanted):
            if row.mode == "given":
                tokens, infos = row.given
                tail = self.tokenizer.decode(row.ids[max(0, p - self.m + 1): p + 1], skip_special_tokens=True)
                out[i] = (tokens, torch.ones(len(tokens), dtype=torch.bool), RetrievalEvent(p, tail, infos))
            else:
                queries.setdefault(row.request.inference.retro_inference.retro_num_neighbors, []).append(i)
        for k, idx in queries.items():
            chunks = [wanted[i][0].ids[max(0, wanted[i][1] - self.m + 1): wanted[i][1] + 1] for i in idx]
            texts = self.tokenizer.decode_batch([list(c) for c in chunks], skip_special_tokens=True)
            t0 = time.perf_counter()
            found = self.retriever.search_texts(texts, k)  # the query texts, decoded once
            stage_metrics("serve").serve_retrieval_latency_seconds(time.perf_counter() - t0)
            tokens = self.retriever.neighbor_tokens(found.ids)  # [n, k, r]
            db = self.retriever.db
            for j, i in enumerate(idx):
                ids = found.ids[j]
                valid = ids[ids >= 0]
                infos = [NeighborInfo(int(c), int(d), t, x, float(dist)) for c, d, t, x, dist in
                         zip(valid, db.global_doc_ids(valid), db.titles(valid), db.texts(valid), found.distances[j][ids >= 0])]
                out[i] = (torch.from_numpy(np.asarray(tokens[j], dtype=np.int64)), torch.from_numpy(ids >= 0),
                          RetrievalEvent(wanted[i][1], texts[j], infos))
        return out

    # ---- forward passes (the model's own, against its RetroCache) --------------------------------

    def _max_neighbors(self, rows: list[_Row]) -> int:
        """Kmax of a cache for these rows: the largest set they have or may retrieve."""
        return max([len(e[1]) for row in rows for e in row.events] +
                   [row.request.inference.retro_inference.retro_num_neighbors for row in rows])

    def _prefill(self, row: _Row, cache: RetroCache) -> torch.Tensor:
        """Feed row.ids from position 0 into a one-row cache, with the row's neighbour events; last logits [V]."""
        if self.model.config.retro.enabled:
            for p, tokens, mask, _ in row.events:
                cache.add_neighbors(0, p, tokens, mask)
        ids = torch.tensor(row.ids, dtype=torch.long, device=self.device)[None]  # [1, T]
        return self.model(ids, cache=cache, positions=0, logits_to_keep=1).logits[0, -1]

    @torch.inference_mode()  # on a generator function, torch enters the mode only while it runs
    def _run(self, rows: list[_Row], is_cancelled, recompute: bool) -> Iterator[list[StreamEvent]]:
        model, dev = self.model, self.device
        B = len(rows)
        S = max(r.n_prompt + r.request.inference.tokens_to_generate for r in rows)

        # Neighbours for the prompts' events, fetched in one batch.
        wanted = [(row, p) for row in rows for p in range(row.n_prompt) if self._is_event(row, p)]
        for (row, p), (tok, msk, ev) in zip(wanted, self._fetch(wanted)):
            row.events.append((p, tok, msk, ev))

        # One cache for the batch; rows sit at their own lengths. recompute: a fresh one per token.
        cache = None if recompute else model.new_cache(B, S, self._max_neighbors(rows))
        lengths = torch.tensor([row.n_prompt for row in rows], dtype=torch.long, device=dev)

        def from_scratch(row: _Row) -> torch.Tensor:  # [V]
            return self._prefill(row, model.new_cache(1, len(row.ids), self._max_neighbors([row])))

        # Prefill one prompt at a time, so each runs at its own positions with its own chunk boundaries.
        logits = torch.stack([from_scratch(row) if recompute else self._prefill(row, cache.row(b))
                              for b, row in enumerate(rows)])  # [B, V]

        while True:
            step_events = []
            for b, row in enumerate(rows):
                if row.finished:
                    continue
                if is_cancelled is not None and is_cancelled(row.index):
                    self._finish(row, "cancelled")
                    step_events.append(StreamEvent(row.index, "", None, True, self._result(row)))
                    continue
                token = self._sample(logits[b], row)
                step_events.append(self._accept(row, token))
            if step_events:
                yield step_events
            active = [b for b, row in enumerate(rows) if not row.finished]
            if not active:
                return
            # Events at the positions about to be fed (a chunk completes), fetched in one batch; the
            # model encodes them in the step that feeds their position.
            wanted = [(b, int(lengths[b])) for b in active if self._is_event(rows[b], int(lengths[b]))]
            for (b, p), (tok, msk, ev) in zip(wanted, self._fetch([(rows[b], p) for b, p in wanted])):
                rows[b].events.append((p, tok, msk, ev))
                if cache is not None:
                    cache.add_neighbors(b, p, tok, msk)
            if recompute:
                new = logits.clone()
                for b in active:
                    new[b] = from_scratch(rows[b])
                logits = new
            else:
                # One token per row at its own position; finished rows feed a dummy token and stay put.
                feed = torch.tensor([row.ids[-1] if not row.finished else self.eod_id for row in rows], device=dev)
                logits = model(feed[:, None], cache=cache, positions=lengths, logits_to_keep=1).logits[:, -1]  # [B, V]
            lengths[active] += 1

    # ---- sampling and finishing ------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, row: _Row) -> int:
        cfg = row.request.inference
        logits = logits[: self.vocab].float().cpu()
        if len(row.generated) < cfg.min_tokens_to_generate and self.eod_id < self.vocab:
            logits[self.eod_id] = float("-inf")
        if cfg.greedy:
            return int(torch.argmax(logits))
        logits = logits / cfg.temperature
        if 0 < cfg.top_k < logits.shape[0]:
            kth = torch.topk(logits, cfg.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if cfg.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            drop = cum - torch.softmax(sorted_logits, dim=-1) >= cfg.top_p  # keep the token that crosses top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=row.rng))

    def _accept(self, row: _Row, token: int) -> StreamEvent:
        cfg = row.request.inference
        if token == self.eod_id:
            self._finish(row, "eod")
        else:
            row.generated.append(token)
            row.ids.append(token)
            text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
            cut = min((text.find(s) for s in cfg.end_strings if s in text), default=-1)
            if cut >= 0:
                self._finish(row, "stop", text[:cut])
            elif len(row.generated) >= cfg.tokens_to_generate:
                self._finish(row, "length", text)
        if row.finished:
            return StreamEvent(row.index, row.final_text[row.emitted:], token, True, self._result(row))
        # Hold back a trailing partial UTF-8 character, and text that may be the start of an end string.
        hold = max((len(s) - 1 for s in cfg.end_strings), default=0)
        safe = text.rstrip("\ufffd")
        safe = safe[: max(row.emitted, len(safe) - hold)]
        new, row.emitted = safe[row.emitted:], max(row.emitted, len(safe))
        return StreamEvent(row.index, new, token, False)

    def _finish(self, row: _Row, reason: str, text: str | None = None) -> None:
        row.finished, row.finish_reason = True, reason
        row.final_text = text if text is not None else self.tokenizer.decode(row.generated, skip_special_tokens=True)

    def _result(self, row: _Row) -> Generation:
        return Generation(prompt=row.request.prompt, text=row.final_text, tokens=list(row.generated),
                          prompt_tokens=row.n_prompt, finish_reason=row.finish_reason,
                          retrievals=[e[3] for e in row.events])
