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

log = logging.getLogger(__name__)


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, progress: bool = True) -> Tokenizer:
    """Train byte-level BPE on ``texts`` (an iterator; the corpus is never held in memory)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[cfg.eod_token],
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
    if tok.token_to_id(cfg.eod_token) is None:
        tok.add_special_tokens([cfg.eod_token])
        log.warning("tokenizer %s had no %s token; added it as id %d", p, cfg.eod_token, tok.token_to_id(cfg.eod_token))
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
