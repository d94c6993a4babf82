"""The GPT tokenizer: byte-level BPE trained on the corpus, or one the user gives.

Whatever its origin, the project keeps one ``tokenizer/tokenizer.json`` that every stage loads.
Byte-level BPE is lossless: decoding the tokens of a text gives the text back, and the tokens of
any slice of a document decode to the bytes of a slice of that document (the chunk database relies
on this).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from retro_ray.config import TokenizerConfig
from retro_ray.errors import RetroRayError
from retro_ray.pretrained import read_json

log = logging.getLogger(__name__)

DEFAULT_EOD = "<|endoftext|>"


def checkpoint_eos_token(path: str | Path) -> str | None:
    """The end-of-text token a Hugging Face model directory declares, or None.

    ``tokenizer_config.json``'s ``eos_token`` first (a string or an AddedToken dict), else
    ``config.json``'s ``eos_token_id`` (the first, when it is a list) looked up in ``tokenizer.json``.
    ``path`` may be the directory or a file in it.
    """
    d = Path(path).expanduser()
    d = d if d.is_dir() else d.parent
    tc = read_json(d / "tokenizer_config.json")
    eos = tc.get("eos_token") if isinstance(tc, dict) else None
    if isinstance(eos, dict):
        eos = eos.get("content")
    if isinstance(eos, str) and eos:
        return eos
    mc = read_json(d / "config.json")
    eid = mc.get("eos_token_id") if isinstance(mc, dict) else None
    if isinstance(eid, list):
        eid = eid[0] if eid else None
    if isinstance(eid, int) and (d / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(d / "tokenizer.json")).id_to_token(eid)
    return None


def resolve_eod_token(cfg: TokenizerConfig) -> str:
    """``cfg.eod_token``, or when empty the checkpoint's end-of-text token (``cfg.path`` a model
    directory), or ``<|endoftext|>``. A checkpoint's own token keeps the documents separated the way
    the pretrained model saw them, which RETRO-fitting relies on."""
    found = checkpoint_eos_token(cfg.path) if cfg.path else None
    if cfg.eod_token:
        if found is not None and found != cfg.eod_token:
            log.warning("tokenizer.eod_token=%r differs from the end-of-text token %r of %s; documents end with %r",
                        cfg.eod_token, found, cfg.path, cfg.eod_token)
        return cfg.eod_token
    return found or DEFAULT_EOD


def vocabulary_difference(ours: Tokenizer, theirs: Tokenizer, names: tuple[str, str] = ("the first", "the second")) -> str | None:
    """The first difference between two tokenizers' vocabularies (ids, added tokens included) or BPE
    merges, as a phrase naming them by ``names``; None when they tokenize alike."""
    first, second = names
    a, b = ours.get_vocab(with_added_tokens=True), theirs.get_vocab(with_added_tokens=True)
    ia, ib = {i: t for t, i in a.items()}, {i: t for t, i in b.items()}
    for i in sorted(set(ia) | set(ib)):
        if ia.get(i) != ib.get(i):
            return f"token id {i} is {ia.get(i)!r} in {first} and {ib.get(i)!r} in {second}"
    ma, mb = (json.loads(t.to_str()).get("model", {}).get("merges") or [] for t in (ours, theirs))
    for j, (x, y) in enumerate(zip(ma, mb)):
        if x != y:
            return f"BPE merge {j} is {x!r} in {first} and {y!r} in {second}"
    if len(ma) != len(mb):
        return f"{first} has {len(ma)} BPE merges and {second} {len(mb)}"
    return None


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, progress: bool = True) -> Tokenizer:
    """Train byte-level BPE on ``texts`` (an iterator; the corpus is never held in memory)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[resolve_eod_token(cfg)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(_batches(texts), trainer=trainer)
    return tok


def _batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_user_tokenizer(path: str, cfg: TokenizerConfig) -> Tokenizer:
    """A tokenizer.json, or GPT-2's vocab.json + merges.txt (file or directory)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        elif (p / "vocab.json").is_file():
            p = p / "vocab.json"
        else:
            raise RetroRayError(
                f"tokenizer directory {p} holds neither tokenizer.json nor vocab.json + merges.txt; "
                "point tokenizer.path at one of those."
            )
    if not p.is_file():
        raise RetroRayError(f"tokenizer file {p} does not exist; fix tokenizer.path, or leave it empty to train one.")
    if p.name == "vocab.json" or (p.suffix == ".json" and (p.parent / "merges.txt").is_file() and _is_plain_vocab(p)):
        merges = p.parent / "merges.txt"
        if not merges.is_file():
            raise RetroRayError(f"{p} is a GPT-2 vocabulary but {merges} is missing; put merges.txt beside it.")
        try:
            tok = Tokenizer(models.BPE.from_file(str(p), str(merges)))
        except Exception as e:
            raise RetroRayError(f"tokenizer {p} + {merges} does not load ({e}); check both files.") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:
            raise RetroRayError(
                f"tokenizer file {p} does not load ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                "give a Hugging Face tokenizer.json or a GPT-2 vocab.json with merges.txt."
            ) from None
    eod = resolve_eod_token(cfg)
    if tok.token_to_id(eod) is None:
        tok.add_special_tokens([eod])
        log.warning("tokenizer %s had no %s token; added it as id %d", p, eod, tok.token_to_id(eod))
    return tok


def _is_plain_vocab(p: Path) -> bool:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "model" not in d


def load_tokenizer(path: Path) -> Tokenizer:
    """Load the project's tokenizer.json."""
    if not Path(path).is_file():
        raise RetroRayError(f"tokenizer {path} is missing; run `retro-ray prep` for this project first.")
    return Tokenizer.from_file(str(path))


def token_dtype(vocab_size: int):
    """The token dtype of the .bin file, as Megatron chooses it (uint16 below 65,500 ids)."""
    import numpy as np

    return np.uint16 if vocab_size < 65500 else np.int32
