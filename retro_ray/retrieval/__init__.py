"""Retrieval database: Faiss index building (``index``) and sharded search on Ray (``shards``).

``retro_ray.retrieval.shards`` imports Ray; import it explicitly where needed.
"""

from retro_ray.retrieval.index import (
    add_range,
    choose_index_string,
    index_dir_name,
    index_type,
    load_index,
    merge_shards,
    merge_topk,
    save_index,
    set_search_params,
    train_index,
)

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
