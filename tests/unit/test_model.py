"""Exact tests of the RETRO model: causality, the CCA shift, neighbour masking, config handling.

Models run in float64 and eval mode (the tiny config has no dropout anyway), so "unchanged" is
checked with torch.equal and "changed" with a margin far above rounding.
"""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from retro_ray.errors import RetroRayError
from retro_ray.model import RetroConfig, RetroModel
from retro_ray.model.retro import (
    IGNORE_INDEX,
    ChunkedCrossAttention,
    RetroSettings,
    _Retrieval,
    default_retro_layers,
)
from retro_ray.train.cpu_tuning import tune_model

M = 16  # tiny config chunk_length
N = 64  # tiny config seq_length
C = N // M
K = 2
R = 2 * M
V = 256


def make_model(**overrides) -> RetroModel:
    torch.manual_seed(0)
    return RetroModel(RetroConfig.tiny(**overrides)).double().eval()


def make_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (batch, N), generator=g)
    neighbors = torch.randint(0, V, (batch, C, K, R), generator=g)
    return tokens, neighbors


# The tiny config's retro settings with an encoder half the decoder's width (2 heads of 16).
NARROW_ENCODER = dataclasses.replace(RetroConfig.tiny().retro, retro_encoder_hidden_size=32)


@pytest.fixture(scope="module", params=["encoder width d", "encoder width d/2"])
def model(request) -> RetroModel:
    """Every test taking this fixture runs on both encoder widths."""
    return make_model() if request.param == "encoder width d" else make_model(retro=NARROW_ENCODER)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-9


# ---- causality -----------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, M - 2, M - 1, M, M + 1, 2 * M - 1, 2 * M, 3 * M - 1, N - 1])
def test_future_tokens_do_not_change_past_logits(model, t):
    tokens, neighbors = make_inputs()
    g = torch.Generator().manual_seed(100 + t)
    changed = tokens.clone()
    changed[:, t:] = torch.randint(0, V, (2, N - t), generator=g)
    assert not torch.equal(changed[:, t:], tokens[:, t:])
    with torch.no_grad():
        a = model(tokens, neighbors).logits
        b = model(changed, neighbors).logits
    assert torch.equal(a[:, :t], b[:, :t])
    assert differs(a[:, t:], b[:, t:])


@pytest.mark.parametrize("j", range(C))
def test_chunk_neighbours_reach_exactly_from_its_last_token(model, j):
    tokens, neighbors = make_inputs()
    changed = neighbors.clone()
    changed[:, j] = torch.randint(0, V, (2, K, R), generator=torch.Generator().manual_seed(200 + j))
    boundary = (j + 1) * M - 1  # chunk j's last token: the first that may see chunk j's neighbours
    with torch.no_grad():
        a = model(tokens, neighbors).logits
        b = model(tokens, changed).logits
    assert torch.equal(a[:, :boundary], b[:, :boundary])
    assert differs(a[:, boundary], b[:, boundary])
    if j + 1 < C:  # the next chunk's first m-1 tokens read chunk j's neighbours directly
        assert differs(a[:, boundary + M - 1], b[:, boundary + M - 1])


def test_first_m_minus_1_tokens_get_no_cca_update(model):
    tokens, neighbors = make_inputs()
    with torch.no_grad():
        a = model(tokens, neighbors).logits
        b = model(tokens).logits
    assert torch.equal(a[:, : M - 1], b[:, : M - 1])
    assert differs(a[:, M - 1], b[:, M - 1])


@pytest.mark.parametrize("t", [M - 1, M, M + 5, 2 * M - 1, 3 * M + 3])
def test_prefix_gives_the_same_logits(model, t):
    """A prefix of any length, with the neighbours of its complete chunks, reproduces the full run."""
    tokens, neighbors = make_inputs()
    with torch.no_grad():
        full = model(tokens, neighbors).logits
        prefix = model(tokens[:, :t], neighbors[:, : t // M]).logits
    torch.testing.assert_close(prefix, full[:, :t], rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [N, 3 * M + 5])
def test_cca_matches_a_per_token_reference(n):
    """Token p's CCA update is its own query attending to chunk ((p+1)//m - 1)'s neighbours, or 0."""
    torch.manual_seed(0)
    cfg = RetroConfig.tiny()
    cca = ChunkedCrossAttention(cfg).double().eval()
    d, chunks = cfg.hidden_size, n // M
    x = torch.randn(2, n, d, dtype=torch.float64)
    encoded = torch.randn(2, chunks, K, R, d, dtype=torch.float64)
    mask = torch.ones(2, chunks, K, dtype=torch.bool)
    mask[0, 1, 0] = False  # one neighbour missing
    mask[1, 2] = False  # a chunk with no neighbour at all
    retrieval = _Retrieval(encoder=None, embedded=None, mask=mask)
    retrieval.encoded = encoded  # stands in for the encoder
    with torch.no_grad():
        out = cca(x, retrieval)
        expected = torch.zeros_like(x)
        for b in range(2):
            for p in range(M - 1, n):
                j = (p + 1) // M - 1
                keys = encoded[b, j].reshape(1, K * R, d)
                key_mask = mask[b, j].repeat_interleave(R)[None]
                expected[b, p] = cca.attn(x[b, p][None, None], keys, key_mask)[0, 0]
    empty = expected[1, 3 * M - 1 : 4 * M - 1]  # the positions that read batch 1's chunk 2
    assert len(empty) > 0 and torch.equal(empty, torch.zeros_like(empty))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_wrong_neighbour_chunk_count_is_rejected(model):
    tokens, neighbors = make_inputs()
    with pytest.raises(ValueError, match="neighbor_tokens must be"):
        model(tokens, neighbors[:, :2])


# ---- retro on / off ------------------------------------------------------------------------------


def test_disabled_retro_is_a_plain_gpt_that_ignores_neighbours():
    plain = make_model(retro=RetroSettings(enabled=False))
    names = [name for name, _ in plain.named_parameters()]
    assert plain.encoder is None
    assert not any("encoder" in name or "cca" in name for name in names)
    tokens, neighbors = make_inputs()
    with torch.no_grad():
        a = plain(tokens).logits
        b = plain(tokens, neighbors).logits
    assert torch.equal(a, b)

    # The retro model's decoder has the same parameter names; without neighbours it is that GPT.
    retro = make_model()
    result = retro.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".cca." in k or ".ln_cca." in k or k.startswith("encoder.")
                                       for k in result.missing_keys)
    with torch.no_grad():
        assert torch.equal(retro(tokens).logits, a)


def test_enabled_without_neighbours_runs(model):
    tokens, _ = make_inputs()
    out = model(tokens, labels=tokens)
    assert out.logits is None  # with labels, the fused loss never makes the logits
    assert torch.isfinite(out.loss)
    assert model(tokens).logits.shape == (2, N, V)


@pytest.mark.parametrize("retro", [RetroConfig.tiny().retro, NARROW_ENCODER], ids=["width d", "width d/2"])
def test_gradients_reach_encoder_and_cca(retro):
    model = make_model(retro=retro)
    tokens, neighbors = make_inputs()
    labels = torch.roll(tokens, -1, dims=1)
    model(tokens, neighbors, labels=labels).loss.backward()
    checked = 0
    for name, p in model.named_parameters():
        if name.startswith("encoder.") or ".cca." in name:
            assert p.grad is not None and p.grad.abs().max() > 0, name
            checked += 1
    assert checked > 20
    assert model.token_embedding.weight.grad.abs().max() > 0


# ---- neighbour mask ------------------------------------------------------------------------------


def test_fully_masked_chunk_is_finite_and_gets_no_update(model):
    tokens, neighbors = make_inputs()
    mask = torch.ones(2, C, K, dtype=torch.bool)
    mask[:, 1] = False  # chunk 1 has no neighbour
    with torch.no_grad():
        masked = model(tokens, neighbors, mask).logits
        assert torch.isfinite(masked).all()
        # Every neighbour missing is exactly retrieval off.
        none = model(tokens, neighbors, torch.zeros(2, C, K, dtype=torch.bool)).logits
        off = model(tokens).logits
    assert torch.equal(none, off)


def test_masking_a_neighbour_equals_removing_it(model):
    tokens, neighbors = make_inputs()
    mask = torch.ones(2, C, K, dtype=torch.bool)
    mask[:, :, 1] = False
    with torch.no_grad():
        masked = model(tokens, neighbors, mask).logits
        removed = model(tokens, neighbors[:, :, :1]).logits
        # A missing database row (-1 ids) needs no mask: it counts as missing by itself.
        minus_one = neighbors.clone()
        minus_one[:, :, 1] = -1
        implicit = model(tokens, minus_one).logits
        full = model(tokens, neighbors).logits
    torch.testing.assert_close(masked, removed, rtol=0, atol=1e-12)
    torch.testing.assert_close(implicit, removed, rtol=0, atol=1e-12)
    assert differs(masked, full)


# ---- loss ----------------------------------------------------------------------------------------


def test_loss_ignores_masked_labels(model):
    tokens, neighbors = make_inputs()
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    labels[0, :10] = IGNORE_INDEX
    with torch.no_grad():
        out = model(tokens, neighbors, labels=labels)
        logits = model(tokens, neighbors).logits  # the same pass without labels (eval mode: deterministic)
        keep = labels != IGNORE_INDEX
        expected = F.cross_entropy(logits[keep], labels[keep])
        torch.testing.assert_close(out.loss, expected.float())
        nothing = model(tokens, neighbors, labels=torch.full_like(labels, IGNORE_INDEX)).loss
    assert nothing.item() == 0.0


# ---- incremental decoding -----------------------------------------------------------------------


DECODERS = {
    "retro": RetroConfig.tiny().retro,
    "retro narrow encoder": NARROW_ENCODER,
    "gpt": RetroSettings(enabled=False),
}


def cached_logits(model: RetroModel, tokens: torch.Tensor, neighbors: torch.Tensor | None, prefill: list[int],
                  step: int = 1) -> list[torch.Tensor]:
    """Row b: prefill tokens[b, :prefill[b]] through a one-row view, then feed `step` tokens at a time,
    both rows in one batched forward at their own positions, until row 0 reaches the end. Chunk j's
    neighbours are added at its last token, (j+1)m-1, before any forward. Returns each row's logits [n_b, V]."""
    B, n = tokens.shape
    cache = model.new_cache(B, n, max_neighbors=K)
    if neighbors is not None:
        for b in range(B):
            for j in range(n // M):
                cache.add_neighbors(b, (j + 1) * M - 1, neighbors[b, j])
    out = [[model(tokens[b : b + 1, : prefill[b]], cache=cache.row(b), positions=0).logits[0]] for b in range(B)]
    at = torch.tensor(prefill)
    while int(at[0]) < n:
        s = min(step, n - int(at[0]))
        feed = torch.stack([tokens[b, int(at[b]) : int(at[b]) + s] for b in range(B)])  # [B, s]
        logits = model(feed, cache=cache, positions=at).logits  # [B, s, V]
        for b in range(B):
            out[b].append(logits[b])
        at += s
    return [torch.cat(o) for o in out]


@pytest.mark.usefixtures("torch_one_thread")  # decode steps are many tiny ops
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("decoder", list(DECODERS))
def test_cached_decode_equals_the_forward_on_the_full_sequence(decoder, step, dtype):
    """Prefill, then decode one (or three) tokens at a time against the model's cache, rows of the
    batch at different lengths, neighbours added at the chunk boundaries: every logit is the no-cache
    forward's on the whole sequence (float64: to 1e-12; float32: to the generator tests' tolerance)."""
    model = make_model(retro=DECODERS[decoder]).to(dtype)
    tokens, neighbors = make_inputs()
    neighbors[0, 1, 1] = -1  # a missing neighbour
    neighbors[1, 2] = -1  # a chunk with no neighbour at all
    retro = model.config.retro.enabled
    prefill = [M + 3, 5]  # row 1 lags 14 tokens behind; events fall inside prefills and decode steps
    with torch.no_grad():
        full = model(tokens, neighbors if retro else None).logits
        rows = cached_logits(model, tokens, neighbors if retro else None, prefill, step)
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    assert [len(r) for r in rows] == [N, N - (prefill[0] - prefill[1])]
    for b, got in enumerate(rows):
        torch.testing.assert_close(got, full[b, : len(got)], **tol)
    if retro:  # the neighbours matter, so the comparison above covers CCA and the encoder
        with torch.no_grad():
            assert differs(model(tokens).logits[:, M - 1 :], full[:, M - 1 :])


@pytest.mark.usefixtures("torch_one_thread")  # decode steps are many tiny ops
def test_a_set_added_mid_chunk_is_read_from_its_position_on():
    """A set may start anywhere (the generator adds one at a prompt's last token): positions before
    it read nothing, it and later positions read it, and prefill = token-by-token decode."""
    model = make_model()
    tokens, neighbors = make_inputs(batch=1)
    p = 9  # before the first chunk completes
    with torch.no_grad():
        off = model(tokens[:, :20]).logits
        outs = []
        for pieces in ([20], [5, 8, 7], [1] * 20):  # in one forward, or split around p
            cache = model.new_cache(1, 20)
            cache.add_neighbors(0, p, neighbors[0, 0])
            at, logits = 0, []
            for s in pieces:
                logits.append(model(tokens[:, at : at + s], cache=cache, positions=at).logits)
                at += s
            outs.append(torch.cat(logits, 1))
    torch.testing.assert_close(outs[0][:, :p], off[:, :p], rtol=0, atol=1e-12)
    assert differs(outs[0][:, p], off[:, p])
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], rtol=0, atol=1e-12)


@pytest.mark.usefixtures("torch_one_thread")  # decode steps are many tiny ops
def test_cache_misuse_is_rejected():
    model = make_model()
    tokens, neighbors = make_inputs(batch=1)
    cache = model.new_cache(1, 20)
    with torch.no_grad():
        model(tokens[:, :10], cache=cache, positions=0)
        cache.add_neighbors(0, 5, neighbors[0, 0])  # position 5 was fed already
        with pytest.raises(ValueError, match="added after that position was fed"):
            model(tokens[:, 10:11], cache=cache, positions=10)
        with pytest.raises(ValueError, match="outside the cache"):
            model(tokens[:, :5], cache=cache, positions=18)
        with pytest.raises(ValueError, match="through cache.add_neighbors"):
            model(tokens[:, :1], neighbors[:, :1], cache=cache, positions=0)
    with pytest.raises(ValueError, match=r"neighbor_tokens must be \[K, r=32\]"):
        cache.add_neighbors(0, 19, neighbors[0, 0, :, :5])
    with pytest.raises(ValueError, match="reads no neighbours"):
        make_model(retro=RetroSettings(enabled=False)).new_cache(1, 4).add_neighbors(0, 0, neighbors[0, 0])


# ---- configuration -------------------------------------------------------------------------------


def test_default_retro_layers():
    assert default_retro_layers(12) == (6, 9, 12)
    assert default_retro_layers(24) == (9, 12, 15, 18, 21, 24)
    assert RetroConfig(num_layers=12).decoder_retro_layers == (6, 9, 12)
    assert RetroConfig(num_layers=24).decoder_retro_layers == (9, 12, 15, 18, 21, 24)
    assert RetroConfig(retro=RetroSettings(enabled=False)).decoder_retro_layers == ()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"seq_length": 100}, r"seq_length=100 is not a multiple of chunk_length=16; set seq_length"),
        ({"hidden_size": 66}, r"hidden_size=66 is not divisible by num_attention_heads=4; set hidden_size"),
        ({"hidden_size": 12, "num_attention_heads": 4}, r"head size .* is odd"),
        ({"retro": RetroSettings(retro_layers=(2, 5))}, r"retro_layers contains 5, outside 1\.\.num_layers=4"),
        ({"retro": RetroSettings(retro_layers=(0,))}, r"retro_layers contains 0"),
        ({"retro": RetroSettings(retro_layers=(2, 2))}, r"lists a layer twice"),
        ({"retro": RetroSettings()}, r"no decoder layer has chunked cross-attention.*retro_layers"),
        ({"retro": RetroSettings(retro_layers=(2,), retro_encoder_cross_attention_layers=(3,))},
         r"retro_encoder_cross_attention_layers contains 3"),
        ({"retro": RetroSettings(retro_layers=(2,), retro_num_neighbors=0)}, r"retro_num_neighbors=0 must be"),
        ({"hidden_dropout": 1.5}, r"hidden_dropout=1.5 must be a probability"),
        ({"vocab_size": 0}, r"vocab_size=0 must be a positive integer"),
        ({"retro": dataclasses.replace(NARROW_ENCODER, retro_encoder_hidden_size=36)},
         r"retro_encoder_hidden_size=36 is not a multiple of the head size .*=16.*\(e\.g\. 32\)"),
        ({"retro": dataclasses.replace(NARROW_ENCODER, retro_encoder_hidden_size=0)},
         r"retro_encoder_hidden_size=0 must be a positive integer"),
        ({"ffn_hidden_size": 99, "retro": NARROW_ENCODER},
         r"encoder's MLP a fractional width .*= 49\.5\); use a multiple of 64"),
    ],
)
def test_config_validation_messages(overrides, match):
    config = RetroConfig.tiny(**overrides)
    with pytest.raises(RetroRayError, match=match):
        config.validate()
    with pytest.raises(RetroRayError, match=match):
        RetroModel(config)


def test_disabled_retro_skips_retro_checks():
    RetroConfig.tiny(retro=RetroSettings(enabled=False, retro_layers=(99,))).validate()


def test_config_dict_round_trip():
    config = RetroConfig.tiny()
    data = json.loads(json.dumps(config.to_dict()))
    assert RetroConfig.from_dict(data) == config
    assert RetroConfig.from_dict(RetroConfig().to_dict()) == RetroConfig()
    assert isinstance(data["retro"]["retro_layers"], list)
    with pytest.raises(RetroRayError, match=r"unknown key\(s\) \['hiden_size'\]"):
        RetroConfig.from_dict({**data, "hiden_size": 64})
    with pytest.raises(RetroRayError, match="'retro' section"):
        RetroConfig.from_dict({**data, "retro": {**data["retro"], "k": 1}})
    model = RetroModel.from_config(data)
    assert model.config == config


def test_a_config_saved_before_the_encoder_width_existed_loads_as_width_d():
    data = RetroConfig.tiny().to_dict()
    del data["retro"]["retro_encoder_hidden_size"]  # as in checkpoints written before the setting
    config = RetroConfig.from_dict(data)
    assert config.encoder_hidden_size == config.hidden_size and config == RetroConfig.tiny()


def test_narrow_encoder_shapes_and_names():
    same, narrow = make_model(), make_model(retro=NARROW_ENCODER)
    assert narrow.config.encoder_num_attention_heads == 2 and narrow.config.encoder_ffn_hidden_size == 128
    same_names = {name for name, _ in same.named_parameters()}
    narrow_names = {name for name, _ in narrow.named_parameters()}
    # Only the input projection is new, so checkpoints of width-d models keep their names.
    assert narrow_names - same_names == {"encoder.input_proj.weight", "encoder.input_proj.bias"}
    assert same_names == narrow_names - {"encoder.input_proj.weight", "encoder.input_proj.bias"}
    assert narrow.encoder.layers[0].attn.qkv.weight.shape == (96, 32)
    assert narrow.encoder.layers[0].cross.kv.weight.shape == (64, 64)  # reads the decoder's d=64 states
    assert narrow.layers[1].cca.attn.kv.weight.shape == (128, 32)  # reads the encoder's 32-wide output
    assert narrow.num_parameters() < same.num_parameters()


def test_every_field_has_help():
    for cls in (RetroConfig, RetroSettings):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name}"


# ---- parameters and FLOPs ------------------------------------------------------------------------


def test_num_parameters(model):
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - V * 64


def test_gpt2_small_size_and_flops():
    with torch.device("meta"):  # no memory, no init cost
        plain = RetroModel(RetroConfig(retro=RetroSettings(enabled=False)))
        retro = RetroModel(RetroConfig())
    n_params = plain.num_parameters()
    # GPT-2 small is 124M with a 1024-row learned position table; RoPE has none.
    assert 122e6 < n_params < 125e6
    assert retro.num_parameters() > n_params
    assert len(retro.retro_layers) == 3
    c = plain.config
    attention = 12 * c.num_layers * c.seq_length * c.hidden_size
    # Matmul FLOPs match 6N + 12*L*n*d up to the biases and norms left out of the estimate.
    assert math.isclose(plain.flops_per_token(), 6 * n_params + attention, rel_tol=2e-3)
    assert retro.flops_per_token() > plain.flops_per_token()


@pytest.mark.parametrize(
    "retro",
    [
        RetroSettings(enabled=False),
        RetroSettings(retro_layers=(3, 6)),
        RetroSettings(retro_layers=(3, 6), retro_encoder_hidden_size=128),
        RetroSettings(retro_layers=(6,), retro_encoder_hidden_size=64, retro_num_neighbors=3,
                      retro_encoder_num_layers=3, retro_encoder_cross_attention_layers=(1, 3)),
    ],
    ids=["gpt", "retro", "encoder width d/2", "d/4, K=3, 3 encoder layers, 2 conditioned"],
)
def test_flops_per_token_is_every_matmul_of_a_training_step(retro):
    """flops_per_token() against torch's own count of one forward + backward pass.

    Train mode with dropout, tuned as on a CPU training worker (cpu_tuning.tune_model), sends CPU
    attention through cpu_tuning.attention's written-out matmuls, which the counter sees (it does not
    count CPU SDPA kernels); like flops_per_token(), they compute the causal scores in full.
    """
    assert_flops_per_token_counts_every_matmul(retro)


@pytest.mark.parametrize(
    "family",
    [
        dict(family="gpt2", max_position_embeddings=256),
        dict(family="llama", num_key_value_heads=2, kv_channels=32, tie_word_embeddings=False),
        dict(family="qwen2", num_key_value_heads=1),
    ],
    ids=["gpt2", "llama gqa, head size 32 of d/h=64, untied", "qwen2 one kv head"],
)
def test_flops_per_token_counts_every_matmul_in_every_family(family):
    assert_flops_per_token_counts_every_matmul(RetroSettings(retro_layers=(3, 6), retro_encoder_hidden_size=128),
                                               **family)


def assert_flops_per_token_counts_every_matmul(retro: RetroSettings, **family) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    config = RetroConfig(vocab_size=512, num_layers=6, hidden_size=256, ffn_hidden_size=1024,
                         num_attention_heads=4, seq_length=256, chunk_length=32, retro=retro, **family)
    model = tune_model(RetroModel(config)).train()
    K = retro.retro_num_neighbors
    tokens = torch.randint(0, 512, (2, 256))
    neighbors = torch.randint(0, 512, (2, 256 // 32, K, 64))
    with FlopCounterMode(display=False) as counter:
        model(tokens, neighbors if retro.enabled else None, labels=tokens).loss.backward()
    assert counter.get_total_flops() / (2 * 256) == pytest.approx(model.flops_per_token(), rel=1e-9)


def test_encoder_width_help_quotes_the_flop_ratios_it_gives():
    """The --help text of retro_encoder_hidden_size cites two FLOP ratios at the 125M size; keep them true."""
    import re

    (help_text,) = [f.metadata["help"] for f in dataclasses.fields(RetroSettings) if f.name == "retro_encoder_hidden_size"]
    width, full, narrow = re.search(r"(\d+) takes RETRO's training FLOPs from ([\d.]+)x GPT's to ([\d.]+)x", help_text).groups()
    with torch.device("meta"):
        gpt = RetroModel(RetroConfig(retro=RetroSettings(enabled=False))).flops_per_token()
        ratios = [RetroModel(RetroConfig(retro=RetroSettings(retro_encoder_hidden_size=w))).flops_per_token() / gpt
                  for w in (None, int(width))]
    assert [f"{r:.2f}" for r in ratios] == [full, narrow]


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = RetroModel(RetroConfig(num_layers=8, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=4,
                                   seq_length=128, vocab_size=512, retro=RetroSettings(retro_layers=(4, 8))))
    std = model.config.init_method_std
    assert model.layers[0].attn.qkv.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.layers[0].mlp.fc_out.weight.std().item() == pytest.approx(std / math.sqrt(16), rel=0.05)
    assert model.layers[3].cca.attn.out_proj.weight.std().item() == pytest.approx(std / 4, rel=0.05)
    assert model.encoder.layers[0].attn.out_proj.weight.std().item() == pytest.approx(std / 2, rel=0.05)


# ---- decoder families ----------------------------------------------------------------------------

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 256}  # with dh=8, theta=5e5: one kept, one smoothed, two scaled
FAMILIES = {
    "gpt2": dict(family="gpt2", max_position_embeddings=96),
    "llama": dict(family="llama", num_key_value_heads=2, kv_channels=8, rope_theta=500000.0, layernorm_epsilon=1e-6,
                  rope_scaling=LLAMA3_SCALING, tie_word_embeddings=False),
    "qwen2": dict(family="qwen2", num_key_value_heads=1, rope_theta=1e6),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request) -> RetroModel:
    return make_model(**FAMILIES[request.param])


def test_families_build_with_their_layout(family_model):
    c, names = family_model.config, {name for name, _ in family_model.named_parameters()}
    layer = family_model.layers[1]  # a CCA layer
    assert ("position_embedding.weight" in names) == (c.family == "gpt2")
    assert ("lm_head.weight" in names) == (not c.tie_word_embeddings)
    assert ("layers.0.mlp.fc_gate.weight" in names) == (c.family != "gpt2")
    assert ("layers.0.attn.qkv.bias" in names) == (c.family != "llama")
    assert ("layers.0.ln_attn.bias" in names) == (c.family == "gpt2")  # RMSNorm has no bias
    # q, k, v rows of the fused projection: h*dh + 2*hk*dh; the encoder and CCA use the family's norm.
    assert layer.attn.qkv.weight.shape[0] == (c.num_attention_heads + 2 * c.kv_heads) * c.head_dim
    assert type(layer.ln_cca) is type(layer.ln_attn) is type(family_model.encoder.layers[0].ln_attn)
    assert (family_model.encoder.layers[0].mlp.fc_gate is None) == (layer.mlp.fc_gate is None) == (c.family == "gpt2")
    assert layer.cca.attn.head_dim == family_model.encoder.layers[0].attn.head_dim == c.head_dim


@pytest.mark.parametrize("t", [1, M - 1, M, 2 * M + 3, N - 1])
def test_families_are_exactly_causal(family_model, t):
    tokens, neighbors = make_inputs()
    changed = tokens.clone()
    changed[:, t:] = torch.randint(0, V, (2, N - t), generator=torch.Generator().manual_seed(100 + t))
    with torch.no_grad():
        a = family_model(tokens, neighbors).logits
        b = family_model(changed, neighbors).logits
    assert torch.equal(a[:, :t], b[:, :t])
    assert differs(a[:, t:], b[:, t:])


@pytest.mark.parametrize("j", [0, C - 1])
def test_families_read_a_chunks_neighbours_from_its_last_token(family_model, j):
    tokens, neighbors = make_inputs()
    changed = neighbors.clone()
    changed[:, j] = torch.randint(0, V, (2, K, R), generator=torch.Generator().manual_seed(200 + j))
    boundary = (j + 1) * M - 1
    with torch.no_grad():
        a = family_model(tokens, neighbors).logits
        b = family_model(tokens, changed).logits
    assert torch.equal(a[:, :boundary], b[:, :boundary])
    assert differs(a[:, boundary], b[:, boundary])


@pytest.mark.usefixtures("torch_one_thread")
@pytest.mark.parametrize("retro", [True, False], ids=["retro", "no retrieval"])
def test_families_cached_decode_equals_the_full_forward(family_model, retro):
    model = family_model
    if not retro:
        model = RetroModel(dataclasses.replace(model.config, retro=RetroSettings(enabled=False))).double().eval()
        model.load_state_dict(family_model.state_dict(), strict=False)
    tokens, neighbors = make_inputs()
    with torch.no_grad():
        full = model(tokens, neighbors if retro else None).logits
        rows = cached_logits(model, tokens, neighbors if retro else None, [M + 3, 5])
        # one row alone: every decode step sees all its keys, so grouped-query heads share one attention call
        alone = cached_logits(model, tokens[:1], neighbors[:1] if retro else None, [5])
    for b, got in enumerate(rows + alone):
        torch.testing.assert_close(got, full[b % 2, : len(got)], rtol=0, atol=1e-12)


def test_llama3_rope_scaling_keeps_high_scales_low_and_smooths_between():
    from retro_ray.model.retro import rope_inv_freq

    base = RetroConfig.tiny(**{**FAMILIES["llama"], "rope_scaling": None})
    scaled = dataclasses.replace(base, rope_scaling=LLAMA3_SCALING)
    plain = rope_inv_freq(base, torch.device("cpu"), torch.float64)
    ratio = rope_inv_freq(scaled, torch.device("cpu"), torch.float64) / plain
    # wavelengths 2*pi/freq: 6.3 (< 256/4: kept), 166 (between: smoothed), 4.4e3 and 1.2e5 (> 256/1: / factor)
    assert ratio[0] == 1 and 1 / 8 < ratio[1] < 1 and torch.allclose(ratio[2:], torch.full((2,), 1 / 8.0, dtype=torch.float64))


def test_gpt2_family_refuses_a_sequence_beyond_its_position_table():
    with pytest.raises(RetroRayError, match=r"^seq_length=128 exceeds max_position_embeddings=96, .*set seq_length "
                                            r"<= 96 or raise max_position_embeddings\.$"):
        RetroConfig.tiny(family="gpt2", max_position_embeddings=96, seq_length=128).validate()
    model = make_model(family="gpt2", max_position_embeddings=64)
    with pytest.raises(RetroRayError, match="65 positions exceed max_position_embeddings=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"family": "mistral"}, r"family='mistral' is not a known decoder family"),
        ({"family": "llama", "num_key_value_heads": 3}, r"num_key_value_heads=3 does not divide num_attention_heads=4"),
        ({"family": "gpt2", "rope_scaling": LLAMA3_SCALING}, r"rope_scaling is a llama/qwen2 setting"),
        ({"family": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, r"needs rope_type linear or llama3"),
        ({"family": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"needs positive \['low_freq"),
        ({"family": "llama", "layernorm_epsilon": 0}, r"layernorm_epsilon=0 must be a positive number"),
        ({"family": "llama", "kv_channels": 12}, r"kv_channels=12, which does not divide it"),
    ],
)
def test_family_config_messages(overrides, match):
    with pytest.raises(RetroRayError, match=match):
        RetroConfig.tiny(**overrides).validate()


def test_family_configs_round_trip():
    for overrides in FAMILIES.values():
        config = RetroConfig.tiny(**overrides)
        assert RetroConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def _tiny_hf_models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    llama = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=128)
    return {
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_layer=2, n_embd=64, n_head=4, n_positions=128,
                                                   bos_token_id=0, eos_token_id=0)),
        "llama gqa head_dim llama3 untied": lambda: LlamaForCausalLM(LlamaConfig(
            **llama, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
            rope_parameters={"rope_theta": 500000.0, **LLAMA3_SCALING})),
        "llama tied": lambda: LlamaForCausalLM(LlamaConfig(**llama, num_key_value_heads=4, tie_word_embeddings=True)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**llama, num_key_value_heads=2)),
    }


@pytest.mark.parametrize("which", list(_tiny_hf_models()))
def test_families_compute_what_transformers_computes(which):
    """A tiny random HF model's weights, mapped by model/hf.py, give the same logits (fp32, retrieval off)."""
    from retro_ray.model.hf import config_from_hf, state_dict_from_hf

    torch.manual_seed(0)
    hf = _tiny_hf_models()[which]().eval()
    with torch.no_grad():
        for p in hf.parameters():  # not HF's init: biases and norm scales must map too
            p.normal_(0.0, 0.2)
    config = config_from_hf(hf.config, chunk_length=M)
    ours = RetroModel(config).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), config))  # strict: every parameter mapped
    tokens = torch.randint(0, V, (2, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = hf(tokens).logits, ours(tokens).logits
    assert want.abs().max() > 0.5  # far from zero, so the comparison below means something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
