"""The JSON files of a directory written by Hugging Face's ``save_pretrained``, read without torch.

A decoder to import (``model/hf.py``), the embedder's BERT (``embedder.py``) and a tokenizer
directory (``tokenizer.py``) are all such directories; a file that cannot be read is one line
naming it and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retro_ray.errors import RetroRayError


def read_json(path: Path) -> Any:
    """The parsed file, or None when there is none."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RetroRayError(f"cannot read {path}: {e}; re-save the model directory with save_pretrained") from None


def read_config_json(d: Path, *, fix: str) -> dict:
    """``d``/config.json as a dict; ``fix`` ends the message when there is none."""
    raw = read_json(d / "config.json")
    if raw is None:
        found = sorted(p.name for p in d.iterdir())[:8]
        raise RetroRayError(f"{d} has no config.json (found: {', '.join(found) or 'nothing'}); {fix}")
    if not isinstance(raw, dict):
        raise RetroRayError(f"{d / 'config.json'} does not hold a JSON object; re-save the model directory with "
                            "save_pretrained")
    return raw
