"""RetroDataset: training samples with their pre-retrieved neighbours.

Item i of a split:
    text             int64 [seq_length + 1]                  sample i (tokens = text[:-1], labels = text[1:])
    neighbor_tokens  int64 [C, k, 2 × chunk_length]          C = seq_length / chunk_length; each neighbour
                                                             chunk + its same-document continuation
    neighbor_mask    bool  [C, k]                            False where fewer than k neighbours exist

Neighbour ids come from the ``query`` stage's memory-mapped blocks and their tokens from the
memory-mapped token dataset, gathered in one vectorised read per item (never one hdf5 open per
chunk). The directory's hash is checked against the project's current settings first.
"""

from __future__ import annotations

import numpy as np
import torch

from retro_ray.errors import RetroRayError
from retro_ray.project import Project


class RetroDataset(torch.utils.data.Dataset):
    def __init__(self, project: Project | str, split: str, num_neighbors: int) -> None:
        from retro_ray.retrieval.chunks import ChunkDatabase
        from retro_ray.stages.query import load_neighbors, make_samples

        self.project = project if isinstance(project, Project) else Project(project)
        self.split = split
        self.blocks, meta = load_neighbors(self.project, split)
        self.num_neighbors_available = int(meta["num_neighbors_save"])
        if num_neighbors > self.num_neighbors_available:
            raise RetroRayError(
                f"{num_neighbors} neighbours per chunk were asked for but the query stage saved "
                f"{self.num_neighbors_available}; lower retro_num_neighbors, or rerun `retro-ray query` with "
                f"query.num_neighbors_save={num_neighbors}."
            )
        if num_neighbors < 0:
            raise RetroRayError(f"num_neighbors={num_neighbors} must be >= 0.")
        self.k = num_neighbors
        self.samples = make_samples(self.project, split)
        if len(self.samples) != meta["num_samples"]:
            raise RetroRayError(
                f"the {split} neighbours cover {meta['num_samples']} samples but the data gives "
                f"{len(self.samples)}; rerun `retro-ray query`."
            )
        self.per_block = int(meta["samples_per_block"])
        self.chunks_per_sample = int(meta["chunks_per_sample"])
        self.db = ChunkDatabase(self.project, "train", include_added=False)  # neighbour ids are all < n_train

    def __len__(self) -> int:
        return len(self.samples)

    def neighbor_ids(self, i: int) -> np.ndarray:
        """int64 [C, k] chunk ids of sample i's neighbours (-1 = none)."""
        block = self.blocks[i // self.per_block]
        j = (i % self.per_block) * self.chunks_per_sample
        return np.asarray(block[j:j + self.chunks_per_sample, :self.k], dtype=np.int64)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        ids = self.neighbor_ids(i)
        return {
            "text": self.samples.tokens(i),
            "neighbor_tokens": self.db.neighbor_tokens(ids),
            "neighbor_mask": ids >= 0,
        }

    def to_ray_dataset(self):
        """The same items as a Ray Data dataset (for Ray Train's ``datasets=``), read in parallel."""
        import ray

        return ray.data.range(len(self)).map_batches(
            _FetchItems, fn_constructor_kwargs=dict(project_root=str(self.project.root), split=self.split,
                                                    num_neighbors=self.k),
            batch_size=64, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2), num_cpus=0.5,
        )


class _FetchItems:
    def __init__(self, project_root: str, split: str, num_neighbors: int) -> None:
        self.ds = RetroDataset(project_root, split, num_neighbors)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [self.ds[int(i)] for i in batch["id"]]
        return {k: np.stack([it[k] for it in items]) for k in ("text", "neighbor_tokens", "neighbor_mask")}

