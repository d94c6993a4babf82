import dataclasses

import pytest

from retro_ray import config as C
from retro_ray.errors import RetroRayError


def test_overrides_build_nested_config():
    d = C.parse_overrides(["corpus.path=/data/docs.jsonl", "corpus.text_field=body", "split=98,2,0", "seed=7"])
    cfg = C.build(C.ProjectConfig, d)
    assert cfg.corpus.path == "/data/docs.jsonl"
    assert cfg.corpus.text_field == "body"
    assert cfg.split == "98,2,0"
    assert cfg.seed == 7
    assert cfg.chunk_length == 64  # untouched default
    assert cfg.split_fractions() == (0.98, 0.02, 0.0)


def test_configs_are_frozen():
    cfg = C.ProjectConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


def test_unknown_key_names_accepted_keys():
    with pytest.raises(RetroRayError, match=r"unknown config key corpus\.txt_field; accepted keys under corpus: path, format, text_field"):
        C.build(C.ProjectConfig, C.parse_overrides(["corpus.txt_field=body"]))
    with pytest.raises(RetroRayError, match=r"unknown config key chunk_len;.*chunk_length"):
        C.build(C.ProjectConfig, C.parse_overrides(["chunk_len=32"]))


def test_wrong_type_names_key():
    with pytest.raises(RetroRayError, match=r"chunk_length='abc' is not an int"):
        C.build(C.ProjectConfig, C.parse_overrides(["chunk_length=abc"]))
    with pytest.raises(RetroRayError, match=r"seed=1.5 is not an int"):
        C.build(C.ProjectConfig, C.parse_overrides(["seed=1.5"]))
    with pytest.raises(RetroRayError, match=r"corpus is a section"):
        C.build(C.ProjectConfig, C.parse_overrides(["corpus=foo"]))


def test_override_syntax_error():
    with pytest.raises(RetroRayError, match="is not key=value"):
        C.parse_overrides(["chunk_length"])


@pytest.mark.parametrize("split", ["abc", "1,2,3,4", "", "0,0,0", "-1,2"])
def test_bad_split(split):
    with pytest.raises(RetroRayError, match="split="):
        C.ProjectConfig(split=split)  # checked on construction


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(chunk_length=0), "chunk_length=0 must be positive"),
        (dict(chunk_length=-3), "must be positive"),
        (dict(chunk_length=128, seq_length=64), "larger than seq_length"),
        (dict(chunk_length=64, seq_length=100), "not a multiple of chunk_length"),
    ],
)
def test_bad_lengths(kw, match):
    with pytest.raises(RetroRayError, match=match):
        C.ProjectConfig(**kw)


def test_optional_and_empty():
    cfg = C.build(C.ProjectConfig, C.parse_overrides(["index.ntrain=", "tokenizer.path=null"]))
    assert cfg.index.ntrain is None and cfg.tokenizer.path is None
    cfg = C.build(C.ProjectConfig, C.parse_overrides(["index.ntrain=5000"]))
    assert cfg.index.ntrain == 5000


def test_round_trip_through_dict():
    cfg = C.build(C.ProjectConfig, C.parse_overrides(["seed=9", "corpus.path=x.jsonl"]))
    assert C.build(C.ProjectConfig, C.to_dict(cfg)) == cfg


def _project_yamls():
    # train_*.yaml are training configs, loaded by tests/unit/test_train_config.py
    return [f for f in sorted(C.shipped_config_dir().glob("*.yaml")) if not f.name.startswith("train_")]


def test_every_shipped_yaml_loads():
    files = _project_yamls()
    assert {f.name for f in files} >= {"defaults.yaml", "demo.yaml"}
    for f in files:
        data = C.load_yaml(f)
        for section, cls in C.RUN_SECTIONS.items():
            project, run = C.split_run_settings(section, data)
            C.build(C.ProjectConfig, project)
            C.build(cls, run)


def test_defaults_yaml_matches_dataclasses():
    data = C.load_yaml(C.shipped_config_dir() / "defaults.yaml")
    for section, cls in C.RUN_SECTIONS.items():
        project, run = C.split_run_settings(section, data)
        assert C.build(cls, run) == cls(), section
        assert set(run) == {f.name for f in dataclasses.fields(cls)}, section  # every run setting is listed
    assert C.build(C.ProjectConfig, project) == C.ProjectConfig()
    assert set(C.flatten(project)) == set(C.flatten(C.to_dict(C.ProjectConfig())))


def test_run_settings_are_told_apart_from_preprocessing_ones():
    project, run = C.split_run_settings("index", C.parse_overrides(["index.index_str=Flat", "index.num_shards=4",
                                                                     "db.docs_per_block=9", "seed=3"]))
    assert run == {"num_shards": 4}
    assert project == {"index": {"index_str": "Flat"}, "seed": 3}
    with pytest.raises(RetroRayError, match=r"unknown config key prep.docs_per_blok; accepted keys under prep"):
        C.split_run_settings("prep", C.parse_overrides(["prep.docs_per_blok=3"]))


def test_help_lists_every_field_with_text():
    rows = C.field_help(C.ProjectConfig)
    keys = [k for k, _, _ in rows]
    assert "corpus.text_field" in keys and "index.ntrain" in keys and "chunk_length" in keys
    assert all(text for _, _, text in rows)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(RetroRayError, match="not valid YAML"):
        C.load_yaml(p)
    with pytest.raises(RetroRayError, match="does not exist"):
        C.load_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize("key", ["embed.batch_size=128", "query.batch_size=32"])
def test_a_moved_key_names_where_it_went(key):
    with pytest.raises(RetroRayError, match=rf"{key.split('=')[0]} is no longer a setting; use embedder.batch_size"):
        C.split_run_settings("embed", C.parse_overrides([key]))


# ---- validation on construction, and pydantic's errors as one line ---------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: C.ProjectConfig(corpus=C.CorpusConfig(format="csv")), r"corpus\.format='csv' is not one of auto, jsonl"),
    (lambda: C.CorpusConfig(holdout_fraction=1.0), r"corpus\.holdout_fraction=1\.0 must be in \[0, 1\)"),
    (lambda: C.TokenizerConfig(vocab_size=100), r"tokenizer\.vocab_size=100 is too small"),
    (lambda: C.EmbedderSettings(batch_size=0), r"embedder\.batch_size=0 must be positive"),
    (lambda: C.IndexSettings(ntrain=0), r"index\.ntrain=0 must be positive"),
    (lambda: C.QuerySettings(num_neighbors_query=5), r"query\.num_neighbors_query=5 must be >= query\.num_neighbors_save=20"),
    (lambda: dataclasses.replace(C.ProjectConfig(), seq_length=100), "not a multiple of chunk_length"),
    (lambda: C.ProjectConfig(seed="x"), r"seed='x' is not an int\."),
    (lambda: C.QueryRunConfig(cpus_per_actor="lots"), r"cpus_per_actor='lots' is not a number\."),
    (lambda: C.PrepRunConfig(docs_per_block=0), r"prep\.docs_per_block=0 must be positive\."),
    (lambda: C.DbRunConfig(docs_per_block=-1), r"db\.docs_per_block=-1 must be positive\."),
    (lambda: C.EmbedRunConfig(chunks_per_block=0), r"embed\.chunks_per_block=0 must be positive\."),
    (lambda: C.IndexRunConfig(num_shards=0), r"index\.num_shards=0 must be positive\."),
    (lambda: C.build(C.IndexRunConfig, {"kmeans": "sklearn"}, prefix="index."),
     r"index\.kmeans='sklearn' is not one of auto, faiss, torch\."),
    (lambda: C.QueryRunConfig(samples_per_block=0), r"query\.samples_per_block=0 must be positive\."),
])
def test_project_configs_are_checked_on_construction(make, match):
    with pytest.raises(RetroRayError, match=match):
        make()


def test_eval_and_serve_configs_are_checked_on_construction():
    from retro_ray.eval.config import EvalConfig
    from retro_ray.serve.config import ServeConfig

    with pytest.raises(RetroRayError, match=r"ks=\[0\] must be a non-empty list"):
        EvalConfig(ks=(0,))
    with pytest.raises(RetroRayError, match=r"batch_size=0 must be at least 1"):
        C.build(EvalConfig, {"batch_size": 0})
    with pytest.raises(RetroRayError, match=r"serve port=0 is not a TCP port"):
        ServeConfig(port=0)
    with pytest.raises(RetroRayError, match=r"serve index='remote' is not one of local, sharded, none"):
        C.build(ServeConfig, {"index": "remote"})


@pytest.mark.parametrize("settings, message", [
    ({"corpus": {"txt_field": "body"}},
     "unknown config key corpus.txt_field; accepted keys under corpus: path, format, text_field, title_field, "
     "normalization, holdout_fraction."),
    ({"chunk_len": 3}, "unknown config key chunk_len; accepted keys under the top level: corpus, tokenizer, split, seed, "
                       "seq_length, chunk_length, embedder, index, query."),
    ({"seed": "abc"}, "seed='abc' is not an int."),
    ({"seed": True}, "seed=True is not an int."),
    ({"corpus": {"holdout_fraction": "half"}}, "corpus.holdout_fraction='half' is not a number."),
    ({"corpus": {"text_field": ["a"]}}, "corpus.text_field=['a'] is not a string."),
    ({"index": {"ntrain": "many"}}, "index.ntrain='many' is not an int or empty."),
    ({"tokenizer": 5}, "tokenizer is a section (path, vocab_size, min_frequency, eod_token), not a value."),
])
def test_validation_errors_are_one_line(settings, message):
    with pytest.raises(RetroRayError) as e:
        C.build(C.ProjectConfig, settings)
    assert str(e.value) == message
    assert "\n" not in str(e.value) and "pydantic" not in str(e.value).lower()


def test_lenient_readings_of_yaml_and_overrides():
    from retro_ray.eval.config import EvalConfig

    cfg = C.build(C.ProjectConfig, C.parse_overrides(["split=98", "seed=1_000", "query.nprobe=3.0", "index.ntrain=",
                                                      "tokenizer.eod_token="]))
    assert (cfg.split, cfg.seed, cfg.query.nprobe, cfg.index.ntrain, cfg.tokenizer.eod_token) == ("98", 1000, 3, None, None)
    ev = C.build(EvalConfig, C.parse_overrides(["ks=1,2", "alphas=0,1", "plots=false", "max_samples="]))
    assert (ev.ks, ev.alphas, ev.plots, ev.max_samples) == ((1, 2), (0.0, 1.0), False, None)
    with pytest.raises(RetroRayError, match=r"ks\[1\]='x' is not an int\."):
        C.build(EvalConfig, {"ks": "1,x"})
    with pytest.raises(RetroRayError, match=r"^ks=5 is not a list; write it as \[1,2,3\] or 1,2,3\.$"):
        C.build(EvalConfig, {"ks": 5})
    for not_a_bool in (1, "yes", "on"):
        with pytest.raises(RetroRayError, match=r"plots=.* is not a bool; use true or false\."):
            C.build(EvalConfig, {"plots": not_a_bool})
    with pytest.raises(RetroRayError, match=r"^unknown config key embed\.batch; accepted keys under embed: chunks_per_block"):
        C.build(C.EmbedRunConfig, {"batch": 1}, prefix="embed.")
