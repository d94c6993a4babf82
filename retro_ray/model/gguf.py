"""GGUF files (llama.cpp, Ollama, LM Studio) -> the same HFCheckpoint a Hugging Face directory gives.

A GGUF file holds a model's hyper-parameters and tokenizer as metadata and its tensors, often
quantised, under llama.cpp's names (``blk.N.attn_q.weight``). We parse none of it ourselves:
the ``gguf`` library reads the file and dequantises, and transformers' GGUF support maps the
metadata onto an HF config, the tensor names onto HF's (undoing llama.cpp's q/k row permutation
and GPT-2's fused layout) and the tokenizer onto a fast tokenizer with its chat template. From there
the file is an HF checkpoint in memory, and ``model/hf.py`` maps it onto our families as it maps a
directory: the imported logits equal transformers' own load of the same file.

Quantised weights are dequantised to float32 once, at import: the model computes in float32 (or
bf16) like any other, with the quantisation's rounding baked into its weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from retro_ray.errors import RetroRayError

GGUF_MAGIC = b"GGUF"
# llama.cpp's general.architecture values we map: each is also transformers' model_type and our family.
GGUF_ARCHITECTURES = ("llama", "qwen2", "gpt2")


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` is named *.gguf or is a file that starts with GGUF's magic bytes."""
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with p.open("rb") as f:
            return p.is_file() and f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _metadata(p: Path) -> dict[str, Any]:
    """transformers' parse of the file's metadata: {"config", "tokenizer", "tokenizer_config"}."""
    try:
        import gguf  # noqa: F401 - transformers needs it; say so in one line
    except ImportError:
        raise RetroRayError(f"{p} is a GGUF file and reading one needs the gguf package, which does not import here; "
                            "pip install gguf") from None
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        return load_gguf_checkpoint(str(p), return_tensors=False)
    except ValueError as e:
        if "not supported" not in str(e):
            raise RetroRayError(f"{p} is not a readable GGUF file ({_first_line(e)}); it may be truncated: copy or "
                                "download it again") from None
        arch = str(e).split("architecture ")[-1].split(" is not")[0]
        raise RetroRayError(f"{p} holds a GGUF model of architecture {arch!r}, which does not map onto a retro-ray "
                            f"family; supported: {', '.join(GGUF_ARCHITECTURES)}") from None
    except Exception as e:  # noqa: BLE001 - a cut or damaged file fails in numpy, struct or the reader itself
        raise RetroRayError(f"{p} is not a readable GGUF file ({_first_line(e)}); it may be truncated: copy or "
                            "download it again") from None


def _tensors(p: Path, skeleton) -> dict[str, torch.Tensor]:
    """The file's tensors, dequantised, under the HF names of ``skeleton``'s parameters."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        return load_gguf_checkpoint(str(p), return_tensors=True, model_to_load=skeleton)["tensors"]
    except NotImplementedError as e:  # gguf's dequantize: "Dequantization for Q8_K is not yet implemented"
        qtype = str(e).removeprefix("Dequantization for ").split(" ")[0]
        raise RetroRayError(f"{p} has tensors quantised as {qtype}, which the gguf library cannot dequantise; use a "
                            "file quantised as F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or a k-quant "
                            "(Q2_K .. Q6_K)") from None


def read_gguf(path: str | Path, *, weights: bool = True, **overrides: Any):
    """A GGUF file of the llama, qwen2 or gpt2 architecture as an ``HFCheckpoint`` (model/hf.py): our
    config and float32 state dict, its tokenizer (transformers' fast tokenizer made from the metadata,
    chat template included), and its end-of-text token. ``weights=False``: config and tokenizer only.
    ``overrides``: seq_length, chunk_length."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from retro_ray.model.hf import HFCheckpoint, config_from_hf, context_length, state_dict_from_hf

    p = Path(path).expanduser()
    if not p.is_file():
        raise RetroRayError(f"{p} does not exist; give a .gguf file or a local Hugging Face model directory")
    meta = _metadata(p)
    raw = dict(meta["config"])
    kind = raw.pop("model_type", None)
    if kind not in GGUF_ARCHITECTURES:
        raise RetroRayError(f"{p} holds a GGUF model of architecture {kind!r}, which does not map onto a retro-ray "
                            f"family; supported: {', '.join(GGUF_ARCHITECTURES)}")
    if kind == "gpt2":  # transformers names these GGUF keys n_ctx and feed_forward_length, which GPT2Config ignores
        for ours, theirs in (("n_positions", "n_ctx"), ("n_inner", "feed_forward_length")):
            if theirs in raw:
                raw[ours] = raw.pop(theirs)
    try:
        hf_config = AutoConfig.for_model(kind, **{k: v for k, v in raw.items() if not k.startswith("_")})
    except (ValueError, TypeError) as e:
        raise RetroRayError(f"{p}: its metadata does not make a {kind} config ({_first_line(e)}); the file is "
                            "damaged or was written by a converter transformers does not follow") from None
    config = config_from_hf(hf_config, **overrides)
    sd: dict[str, torch.Tensor] = {}
    if weights:
        with torch.device("meta"):  # only its parameter names, for transformers' GGUF -> HF name map
            skeleton = AutoModelForCausalLM.from_config(hf_config)
        sd = state_dict_from_hf({k: v.float() for k, v in _tensors(p, skeleton).items()}, config, str(p))
    hf_tok = _hf_tokenizer(p) if meta.get("tokenizer") else None
    return HFCheckpoint(path=p.resolve(), config=config, state_dict=sd, tokenizer_path=None,
                        tokenizer_vocab_size=len(hf_tok) if hf_tok is not None else None,
                        eos_token=hf_tok.eos_token if hf_tok is not None else None,
                        tokenizer=hf_tok.backend_tokenizer if hf_tok is not None else None,
                        chat_template=getattr(hf_tok, "chat_template", None), hf_tokenizer=hf_tok,
                        context_length=context_length(hf_config))


def _hf_tokenizer(p: Path):
    """transformers' fast tokenizer made from the file's metadata."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - the converter raises bare errors on tokenizer kinds it lacks
        raise RetroRayError(f"{p}: its tokenizer metadata does not convert to a Hugging Face tokenizer "
                            f"({_first_line(e)}); give the model's tokenizer.json with tokenizer.path= instead") from None


def read_gguf_tokenizer(path: str | Path):
    """The tokenizers.Tokenizer of a GGUF file (None when it carries none)."""
    p = Path(path).expanduser()
    return _hf_tokenizer(p).backend_tokenizer if _metadata(p).get("tokenizer") else None


def write_tokenizer_dir(hf_tokenizer, out_dir: str | Path) -> Path:
    """Write a transformers tokenizer (a GGUF file's, from ``read_gguf``) as a Hugging Face tokenizer
    directory: tokenizer.json (vocabulary, merges, special tokens) and tokenizer_config.json (end-of-text
    token, chat template), which ``prep tokenizer.path=`` and ``AutoTokenizer.from_pretrained`` read.
    Atomic: written beside, then renamed into place."""
    import shutil
    import tempfile

    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
