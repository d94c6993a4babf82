"""Generator: KV-cache decoding equals full recomputation and the training forward; sampling; bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from retro_ray.config import TokenizerConfig
from retro_ray.errors import RetroRayError
from retro_ray.model.retro import RetroConfig, RetroModel
from retro_ray.serve.generate import (
    GenerationRequest,
    Generator,
    InferenceConfig,
    RetrievalEvent,
    RetroInferenceSettings,
)
from retro_ray.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("torch_one_thread")
M = 16  # chunk length of the tiny model


@pytest.fixture(scope="module")
def tokenizer(wiki_docs):
    return train_tokenizer((t for _, t in wiki_docs[:150]), TokenizerConfig(vocab_size=400), progress=False)


def make_generator(tokenizer, retro: bool = True, seed: int = 0, encoder_width: int | None = None,
                   **family) -> Generator:
    torch.manual_seed(seed)
    cfg = RetroConfig.tiny(vocab_size=512, chunk_length=M, **family)
    d = cfg.to_dict()
    d["retro"]["enabled"] = retro
    d["retro"]["retro_encoder_hidden_size"] = encoder_width
    cfg = RetroConfig.from_dict(d)
    return Generator(RetroModel(cfg), tokenizer, eod_id=tokenizer.token_to_id("<|endoftext|>"))


@pytest.fixture(scope="module")
def gen(tokenizer) -> Generator:
    return make_generator(tokenizer)


@pytest.fixture(scope="module")
def narrow_gen(tokenizer) -> Generator:
    """The tiny model with an encoder half the decoder's width."""
    return make_generator(tokenizer, encoder_width=32)


def greedy(n: int, **kw) -> InferenceConfig:
    return InferenceConfig(tokens_to_generate=n, greedy=True, **kw)


PROMPTS = ["The river flows", "In 1066 the Normans crossed the Channel and defeated the English army at Hastings, "
           "which changed the language and the laws of England for", "Music"]


@pytest.mark.parametrize("which", ["gen", "narrow_gen"])
@pytest.mark.parametrize("T", [3 * M, 3 * M + 5, M - 1])
def test_prefill_equals_the_training_forward(request, which, T):
    """With neighbours at the chunk boundaries, the generator's prefill (the model's forward against a
    fresh cache) is the model's training forward."""
    gen = request.getfixturevalue(which)
    g = torch.Generator().manual_seed(T)
    tokens = torch.randint(0, 400, (T,), generator=g)
    C, K = T // M, 2
    neighbours = torch.randint(0, 400, (1, C, K, 2 * M), generator=g)
    if C:
        neighbours[0, 0, 1] = -1  # a missing neighbour
    row = gen._start_row(0, GenerationRequest("x", inference=greedy(1)))
    row.ids = tokens.tolist()
    row.events = [((j + 1) * M - 1, neighbours[0, j], torch.ones(K, dtype=torch.bool), RetrievalEvent(0, "", []))
                  for j in range(C)]
    with torch.inference_mode():
        logits = gen._prefill(row, gen.model.new_cache(1, T, max_neighbors=K))
        want = gen.model(tokens[None], neighbours).logits[0, -1]
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("retro", "encoder_width"), [(True, None), (True, 32), (False, None)],
                         ids=["retro", "retro narrow encoder", "gpt"])
def test_cache_equals_full_recomputation_for_a_batch_of_lengths(tokenizer, retro, encoder_width):
    gen = make_generator(tokenizer, retro=retro, seed=1, encoder_width=encoder_width)
    neighbours = ["The Normans were descendants of Vikings.", "Hastings is a town in East Sussex."] if retro else None
    reqs = [GenerationRequest(PROMPTS[0], inference=greedy(3 * M + 3)),
            GenerationRequest(PROMPTS[1], neighbours, inference=greedy(2 * M)),
            GenerationRequest(PROMPTS[2], inference=greedy(M + 1, add_BOS=True))]
    cached = gen.generate(reqs)
    full = gen.generate(reqs, recompute=True)
    for c, f, r in zip(cached, full, reqs):
        assert c.tokens == f.tokens
        assert len(c.tokens) == r.inference.tokens_to_generate and c.finish_reason == "length"
    # the batch gives what each prompt gives alone
    assert [gen.generate([r])[0].tokens for r in reqs] == [c.tokens for c in cached]
    assert cached[2].prompt_tokens == len(tokenizer.encode(PROMPTS[2]).ids) + 1  # BOS
    if retro:
        (event,) = cached[1].retrievals
        assert event.position == cached[1].prompt_tokens - 1
        assert [n.text for n in event.neighbors] == neighbours


@pytest.mark.parametrize("family", [
    dict(family="gpt2", max_position_embeddings=256),
    dict(family="llama", num_key_value_heads=2, tie_word_embeddings=False),
    dict(family="qwen2", num_key_value_heads=1, rope_theta=1e6),
], ids=["gpt2", "llama", "qwen2"])
def test_every_family_generates_with_the_cache_as_without(tokenizer, family):
    gen = make_generator(tokenizer, seed=4, **family)
    reqs = [GenerationRequest(PROMPTS[0], inference=greedy(M + 3)),
            GenerationRequest(PROMPTS[1], ["The Normans were descendants of Vikings."], inference=greedy(M))]
    cached, full = gen.generate(reqs), gen.generate(reqs, recompute=True)
    assert [c.tokens for c in cached] == [f.tokens for f in full]
    assert all(len(c.tokens) == r.inference.tokens_to_generate for c, r in zip(cached, reqs))


def test_given_neighbours_change_the_output(tokenizer):
    gen = make_generator(tokenizer, seed=2)
    cfg = InferenceConfig(tokens_to_generate=30, seed=5, top_p=1.0)  # same draws: only the logits differ
    a = gen.generate([GenerationRequest(PROMPTS[1], ["alpha beta gamma"], cfg)])[0]
    b = gen.generate([GenerationRequest(PROMPTS[1], ["the king of England"], cfg)])[0]
    none = gen.generate([GenerationRequest(PROMPTS[1], None, cfg)])[0]
    assert a.tokens != b.tokens and a.tokens != none.tokens and none.retrievals == []
    # only the first retro_num_neighbors given neighbours are used
    one = gen.generate([GenerationRequest(PROMPTS[1], ["alpha beta gamma", "x"],
                                          dataclasses.replace(cfg, retro_inference=RetroInferenceSettings(1)))])[0]
    assert one.tokens == a.tokens and len(one.retrievals[0].neighbors) == 1


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(gen):
    cfg = InferenceConfig(tokens_to_generate=25, seed=7, temperature=0.8, top_p=0.95)
    a, b = gen.generate([GenerationRequest(PROMPTS[0], inference=cfg)] * 2)
    assert a.tokens == b.tokens
    c = gen.generate([GenerationRequest(PROMPTS[0], inference=InferenceConfig(tokens_to_generate=25, seed=8))])[0]
    assert c.tokens != a.tokens
    top1 = gen.generate([GenerationRequest(PROMPTS[0], inference=InferenceConfig(tokens_to_generate=25, top_k=1, seed=3))])[0]
    assert top1.tokens == gen.generate([GenerationRequest(PROMPTS[0], inference=greedy(25))])[0].tokens


def test_tiny_top_p_is_greedy(gen):
    nucleus = gen.generate([GenerationRequest(PROMPTS[2], inference=InferenceConfig(tokens_to_generate=15, top_p=1e-6))])[0]
    assert nucleus.tokens == gen.generate([GenerationRequest(PROMPTS[2], inference=greedy(15))])[0].tokens


def test_end_strings_cut_the_text(gen):
    full = gen.generate([GenerationRequest(PROMPTS[0], inference=greedy(30))])[0]
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    cut = gen.generate([GenerationRequest(PROMPTS[0], inference=greedy(30, end_strings=(stop,)))])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


def test_end_of_document_stops_unless_banned(tokenizer):
    gen = make_generator(tokenizer, seed=3)
    eod = gen.eod_id
    with torch.no_grad():  # final hidden state = all ones; the end-of-document row is the only one aligned with it
        gen.model.ln_f.weight.zero_()
        gen.model.ln_f.bias.fill_(1.0)
        gen.model.token_embedding.weight[eod] = 1.0
    stopped = gen.generate([GenerationRequest(PROMPTS[0], inference=greedy(10))])[0]
    assert stopped.finish_reason == "eod" and stopped.tokens == []
    forced = gen.generate([GenerationRequest(PROMPTS[0], inference=greedy(10, min_tokens_to_generate=4))])[0]
    assert len(forced.tokens) == 4 and forced.finish_reason == "eod" and eod not in forced.tokens


def test_stream_pieces_add_up_to_the_text_and_cancel_frees_the_row(gen):
    reqs = [GenerationRequest(PROMPTS[0], inference=greedy(12)), GenerationRequest(PROMPTS[2], inference=greedy(40))]
    pieces = {0: "", 1: ""}
    final = {}
    steps = [0]
    for events in gen.stream(reqs, is_cancelled=lambda i: i == 1 and steps[0] >= 5):
        steps[0] += 1
        for e in events:
            pieces[e.index] += e.text
            if e.finished:
                final[e.index] = e.generation
    assert pieces[0] == final[0].text and final[0].finish_reason == "length"
    assert final[1].finish_reason == "cancelled" and len(final[1].tokens) == 5
    assert steps[0] == 12  # the cancelled row did not keep the batch running


def test_grad_mode_is_not_changed_for_the_caller(gen):
    for _ in gen.stream([GenerationRequest(PROMPTS[0], inference=greedy(3))]):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


@pytest.mark.parametrize(("request_", "match"), [
    (GenerationRequest(""), "the prompt is empty"),
    (GenerationRequest("hi", neighbors="a neighbour"), "neighbors must be a list of strings"),
    (GenerationRequest("hi", neighbors=["ok", 3]), "neighbors must be a list of strings"),
])
def test_bad_requests(gen, request_, match):
    with pytest.raises(RetroRayError, match=match):
        gen.generate([request_])


@pytest.mark.parametrize(("make", "match"), [
    (lambda: InferenceConfig(temperature=0.0), r"inference\.temperature=0.0: must be > 0"),
    (lambda: InferenceConfig(tokens_to_generate=0), r"inference\.tokens_to_generate=0: give a whole number"),
    (lambda: InferenceConfig(top_p=1.5), r"inference\.top_p=1.5: must be in \(0, 1\]"),
    (lambda: InferenceConfig(top_k=-1), r"inference\.top_k=-1: must be a whole number"),
    (lambda: InferenceConfig(end_strings=("",)), r"inference\.end_strings=\(''\,\): must be non-empty strings"),
    (lambda: RetroInferenceSettings(retro_num_neighbors=0), r"inference\.retro_inference\.retro_num_neighbors=0"),
    (lambda: InferenceConfig(tokens_to_generate="many"), r"tokens_to_generate='many' is not an int"),
])
def test_bad_sampling_settings_are_refused_on_construction(make, match):
    with pytest.raises(RetroRayError, match=match):
        make()


def test_gpt_rejects_neighbours_and_empty_prompt_with_bos_works(tokenizer):
    gpt = make_generator(tokenizer, retro=False)
    with pytest.raises(RetroRayError, match="is a GPT"):
        gpt.generate([GenerationRequest("hi", ["x"])])
    out = gpt.generate([GenerationRequest("", inference=greedy(4, add_BOS=True, min_tokens_to_generate=4))])[0]
    assert out.prompt_tokens == 1 and len(out.tokens) == 4
