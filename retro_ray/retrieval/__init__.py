"""Retrieval database: Faiss index building (``index``) and sharded search on Ray (``shards``).

``retro_ray.retrieval.shards`` imports Ray; import it explicitly where needed. The names of
``index`` below are loaded on first use, so that importing ``retro_ray.retrieval.chunks`` (as the
training dataset does in every Ray Train worker) does not load Faiss.
"""

import importlib
from typing import Any

__all__ = [
    "add_range",
    "choose_index_string",
    "index_dir_name",
    "index_type",
    "load_index",
    "merge_shards",
    "merge_topk",
    "save_index",
    "set_search_params",
    "train_index",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("retro_ray.retrieval.index"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
