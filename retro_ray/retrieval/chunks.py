"""The chunk database as the retrieval side reads it: chunk id → tokens, text, document.

Chunk rows come from ``db/merged/<split>.hdf5`` (read once, as one array: 20 bytes a chunk);
tokens come from the memory-mapped token dataset. A neighbour, as RETRO feeds it to the encoder,
is the chunk plus its continuation — the next ``chunk_length`` tokens of the SAME document — padded
with the end-of-document token to ``2 × chunk_length``. (Megatron reads the continuation from the
next row of the database, which crosses into the next document at a document's last chunk.)

The train database also presents the documents added after training (``retro-ray add-docs``,
:mod:`retro_ray.stages.add_docs`): chunk ids ``0 .. n_train - 1`` are the train chunks, as the query
stage and training see them, and ``n_train ..`` the added ones, in the order they were added. The
added documents live in their own store, ``db/added/``, so nothing the model was trained on changes:

    db/added/CURRENT.json      the commit record (replaced atomically): version, counts, the
                               version directory, the database sizes the store extends
    db/added/tokens.bin        tokens of the added documents, each followed by the end-of-document
                               token; append-only (bytes past CURRENT's count are an unfinished add)
    db/added/embeddings.f32    float32 [chunks, dim], row i = added chunk n_train + i; append-only
    db/added/v<version>/       chunks.npy uint32 [chunks, 5] (dataset_idx, doc_idx, token_start,
                               token_end, bert_len; doc_idx counts added documents) and docs.parquet
                               (doc_id, title, digest, token_start, n_tokens, n_chunks, version, source)

A reader loads the version CURRENT names (:meth:`ChunkDatabase.refresh` picks up a newer one).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np

from retro_ray.errors import RetroRayError
from retro_ray.indexed import IndexedDataset
from retro_ray.project import Project


def decode_chunks(ds: IndexedDataset, rows: np.ndarray, tokenizer) -> list[str]:
    """Text of chunk rows (dataset_idx, doc_idx, token_start, token_end, bert_len) of ``ds``."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return []
    token0 = (ds.sequence_pointers[rows[:, 1]] // ds.dtype.itemsize).astype(np.int64)
    lists = [ds.bin[a:b].tolist() for a, b in zip(token0 + rows[:, 2], token0 + rows[:, 3])]
    return tokenizer.decode_batch(lists, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------
# The added-documents store (written by retro_ray.stages.add_docs; read here)
# ------------------------------------------------------------------------------------------------
ADDED_FORMAT = 1


def read_added_state(project: Project) -> dict | None:
    """The last committed add (CURRENT.json), or None when no document was ever added."""
    path = project.added_state_path
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise RetroRayError(
            f"{path} is not valid JSON ({e.msg}); it is only ever replaced atomically, so the file was edited "
            f"by hand: restore it, or delete {project.added_dir} and add the documents again"
        ) from None
    if state.get("format") != ADDED_FORMAT:
        raise RetroRayError(
            f"{path} has format {state.get('format')!r}, this retro-ray reads format {ADDED_FORMAT}; "
            f"delete {project.added_dir} and add the documents again"
        )
    return state


class TokenStore:
    """The few attributes of ``IndexedDataset`` the chunk readers use, over an append-only token file.

    ``tokens`` holds the committed tokens only; ``starts`` / ``lengths`` (in tokens) locate each document.
    """

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> None:
        self.bin = tokens
        self.dtype = tokens.dtype
        self.sequence_pointers = np.asarray(starts, dtype=np.int64) * self.dtype.itemsize
        self.sequence_lengths = np.asarray(lengths, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_tokens(self) -> int:
        return int(len(self.bin))


class AddedChunks:
    """One committed version of the added-documents store, read-only.

    ``doc_ids`` are global document ids: ``n_base_docs + i`` for the i-th added document, after every
    row of docs.parquet, so they never collide with a corpus document (the query stage's
    same-document filter and ``titles`` rely on that).
    """

    def __init__(self, project: Project, state: dict) -> None:
        import pyarrow.parquet as pq

        self.project = project
        self.state = state
        self.version = int(state["version"])
        self.n_base_chunks = int(state["n_base_chunks"])
        self.n_base_docs = int(state["n_base_docs"])
        self.dim = int(state["dim"])
        self.chunks = np.load(project.added_chunks_path(state["dir"]))  # uint32 [M, 5]
        table = pq.read_table(project.added_doc_table_path(state["dir"]), columns=["doc_id", "title", "digest", "token_start", "n_tokens"])
        self.doc_ids = table.column("doc_id").to_numpy().astype(np.int64)
        self.titles: list[str] = table.column("title").to_pylist()
        self.digests: list[str] = table.column("digest").to_pylist()
        n_tokens = int(state["tokens"])
        dtype = np.dtype(state["token_dtype"])
        tokens = (np.memmap(project.added_tokens_path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens
                  else np.zeros(0, dtype))
        self.ds = TokenStore(tokens, table.column("token_start").to_numpy(), table.column("n_tokens").to_numpy())
        if len(self.chunks) != int(state["chunks"]) or len(self.doc_ids) != int(state["docs"]):
            raise RetroRayError(
                f"{project.added_version_dir(state['dir'])} holds {len(self.chunks)} chunks / {len(self.doc_ids)} "
                f"documents but CURRENT.json says {state['chunks']} / {state['docs']}; the store was changed by hand: "
                f"delete {project.added_dir} and add the documents again"
            )

    def __len__(self) -> int:
        return len(self.chunks)

    def embeddings(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """float32 [end - start, dim]: the stored embeddings of added chunks start .. end - 1 (local numbers)."""
        n = len(self.chunks)
        end = n if end is None else end
        if n == 0 or end <= start:
            return np.zeros((0, self.dim), np.float32)
        emb = np.memmap(self.project.added_embeddings_path, dtype=np.float32, mode="r", shape=(n, self.dim))
        return np.array(emb[start:end])


def load_added(project: Project, state: dict | None = None, attempts: int = 5) -> AddedChunks | None:
    """The committed added-documents store, or None. Retries when a concurrent add removed the version
    it was reading (a writer keeps the previous version, so this only happens after two quick adds)."""
    for attempt in range(attempts):
        state = read_added_state(project) if state is None or attempt else state
        if state is None:
            return None
        try:
            return AddedChunks(project, state)
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05)
    return None  # pragma: no cover


# ------------------------------------------------------------------------------------------------
# Reading chunks
# ------------------------------------------------------------------------------------------------
def map_h5_dataset(path: Path, name: str) -> np.ndarray:
    """Dataset ``name`` of an hdf5 file as a read-only memory map (h5py's contiguous, uncompressed
    layout, which ``db`` writes), or read whole when it is stored otherwise (chunked or empty)."""
    with h5py.File(path, "r") as f:
        dset = f[name]
        offset = dset.id.get_offset()
        if offset is None or dset.chunks is not None or dset.compression is not None:
            return dset[:]
        shape, dtype = dset.shape, dset.dtype
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


class _Part:
    """Chunk rows and the tokens they point into: the train database, or the added documents."""

    def __init__(self, chunks: np.ndarray, ds, doc_ids: np.ndarray, eod_id: int) -> None:
        self.chunks = chunks
        self.ds = ds
        self.doc_ids = doc_ids
        self.eod_id = eod_id

    def _doc_tokens(self, doc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first token, text length without the trailing end-of-document) of each document in ``doc``.

        Looked up per call rather than kept for every document: a query actor or a generator replica
        would otherwise hold 16 B a document (32 GB for 2 B documents)."""
        ds = self.ds
        token0 = (ds.sequence_pointers[doc] // ds.dtype.itemsize).astype(np.int64)
        lengths = ds.sequence_lengths[doc].astype(np.int64)
        if len(ds.bin) == 0 or len(doc) == 0:
            return token0, lengths
        last = ds.bin[np.maximum(token0 + lengths - 1, 0)]
        return token0, lengths - ((lengths > 0) & (last == self.eod_id)).astype(np.int64)

    def neighbor_tokens(self, local_ids: np.ndarray, r: int, eod_id: int) -> np.ndarray:
        rows = self.chunks[local_ids].astype(np.int64)
        doc, start = rows[:, 1], rows[:, 2]
        token0, text_len = self._doc_tokens(doc)
        avail = np.minimum(text_len - start, r)
        pos = np.arange(r, dtype=np.int64)[None, :]
        keep = pos < avail[:, None]
        idx = np.where(keep, (token0 + start)[:, None] + pos, 0)
        tokens = self.ds.bin[idx] if len(self.ds.bin) else np.zeros(idx.shape, np.int64)
        return np.where(keep, tokens, eod_id).astype(np.int64)


class ChunkDatabase:
    """Read access to the chunks of one split's database.

    For the train split, the documents added after training come after the train chunks (ids
    ``n_train ..``) unless ``include_added=False``. The added part is loaded at construction;
    :meth:`refresh` loads a newer commit. Each call reads one snapshot of it, so a refresh from another
    thread never gives a call half-old, half-new data.
    """

    def __init__(self, project: Project, split: str = "train", include_added: bool = True) -> None:
        self.project = project
        self.split = split
        cfg = project.read_config()
        derived = project.derived()
        self.chunk_length = cfg.chunk_length
        self.eod_id = int(derived["eod_id"])
        # Mapped, not read: every query actor and generator replica holds a database, and at 2 T tokens
        # the chunk table alone is 625 GB (20 B a chunk); mapped pages are shared and evictable.
        self.chunks = map_h5_dataset(project.merged_db_path(split), "chunks")  # uint32 [n, 5]
        self.ds = IndexedDataset(project.token_prefix(split))
        self.doc_ids = np.load(project.doc_ids_path(split), mmap_mode="r")  # split-local doc → docs.parquet row
        self._train = _Part(self.chunks, self.ds, self.doc_ids, self.eod_id)
        self.n_train = len(self.chunks)
        self.include_added = include_added and split == "train"
        self._added: tuple[AddedChunks, _Part] | None = None
        self._tokenizer = None
        self._titles = None
        if self.include_added:
            self.refresh()

    def __len__(self) -> int:
        added = self._added
        return self.n_train + (len(added[0]) if added else 0)

    @property
    def added(self) -> AddedChunks | None:
        """The added-documents store this database presents (None when there is none)."""
        added = self._added
        return added[0] if added else None

    @property
    def added_version(self) -> int:
        added = self._added
        return added[0].version if added else 0

    def refresh(self) -> bool:
        """Load the added documents' latest commit, if newer than the one held; True when it changed."""
        if not self.include_added:
            return False
        state = read_added_state(self.project)
        if state is None or int(state["version"]) == self.added_version:
            return False
        if int(state["n_base_chunks"]) != self.n_train:
            raise RetroRayError(
                f"the added documents in {self.project.added_dir} extend a database of {state['n_base_chunks']} "
                f"chunks but db/merged/train.hdf5 has {self.n_train}; the database was rebuilt: delete "
                f"{self.project.added_dir} and add the documents again"
            )
        store = load_added(self.project, state)
        part = _Part(store.chunks, store.ds, store.doc_ids, self.eod_id)
        self._added = (store, part)  # one assignment: readers see the old pair or the new one
        return True

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from retro_ray.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.project.tokenizer_path)
        return self._tokenizer

    def _parts(self, flat: np.ndarray):
        """Split valid ids (>= 0) between the parts: yields (part, positions in flat, local ids)."""
        added = self._added
        n_total = self.n_train + (len(added[0]) if added else 0)
        if len(flat) and int(flat.max(initial=-1)) >= n_total:
            bad = int(flat.max())
            raise RetroRayError(
                f"chunk id {bad} is beyond the {n_total} chunks of the database; the index is newer than this "
                "ChunkDatabase: refresh it (ChunkDatabase.refresh / Retriever.sync_added) or reload the retriever"
            )
        train = np.flatnonzero((flat >= 0) & (flat < self.n_train))
        yield self._train, train, flat[train]
        if added:
            pos = np.flatnonzero(flat >= self.n_train)
            yield added[1], pos, flat[pos] - self.n_train

    def global_doc_ids(self, chunk_ids: np.ndarray) -> np.ndarray:
        """Global document id of each chunk (the docs.parquet row; added documents come after the
        last row); -1 where the chunk id is -1."""
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
        flat = chunk_ids.reshape(-1)
        out = np.full(flat.shape, -1, dtype=np.int64)
        for part, pos, local in self._parts(flat):
            out[pos] = part.doc_ids[part.chunks[local, 1].astype(np.int64)]
        return out.reshape(chunk_ids.shape)

    def neighbor_tokens(self, chunk_ids: np.ndarray) -> np.ndarray:
        """int64 [..., 2 × chunk_length]: chunk + same-document continuation, EOD-padded.

        Vectorised over any shape of ids; an id of -1 gives a row of EOD tokens.
        """
        ids = np.asarray(chunk_ids, dtype=np.int64)
        r = 2 * self.chunk_length
        flat = ids.reshape(-1)
        out = np.full((len(flat), r), self.eod_id, dtype=np.int64)
        for part, pos, local in self._parts(flat):
            if len(pos):
                out[pos] = part.neighbor_tokens(local, r, self.eod_id)
        return out.reshape(*ids.shape, r)

    def texts(self, chunk_ids: np.ndarray) -> list[str]:
        flat = np.asarray(chunk_ids, dtype=np.int64).reshape(-1)
        out = [""] * len(flat)
        for part, pos, local in self._parts(flat):
            for p, text in zip(pos, decode_chunks(part.ds, part.chunks[local], self.tokenizer)):
                out[p] = text
        return out

    def titles(self, chunk_ids: np.ndarray) -> list[str]:
        if self._titles is None:
            import pyarrow.parquet as pq

            self._titles = pq.read_table(self.project.docs_path, columns=["title"]).column("title").to_pylist()
        added = self.added
        out = []
        for g in self.global_doc_ids(np.asarray(chunk_ids, dtype=np.int64).reshape(-1)):
            if g < 0:
                out.append("")
            elif added is not None and g >= added.n_base_docs:
                out.append(added.titles[g - added.n_base_docs])
            else:
                out.append(self._titles[g])
        return out

    @staticmethod
    def path_of(project: Project, split: str) -> Path:
        return project.merged_db_path(split)
