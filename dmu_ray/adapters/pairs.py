"""Paired vectors: the same items embedded by the old and the new model, from two committed
galleries that share ids (vectors of any modality), joined on Ray Data.

The join is a hash join in two passes, so no process holds either gallery:
1. one task per gallery file reads its ids and vectors and writes them, split into ``B`` buckets by
   a hash of the id, under ``<work>/<side>/b<k>/`` (Arrow IPC files: scratch, read once);
2. one task per bucket reads both sides' rows of that bucket, joins them on the id, and returns
   the counts (matched, old only, new only) and the sufficient statistics of its fitted pairs
   (:class:`~dmu_ray.adapters.stats.PairStats`); the held-out pairs (a seeded share by id, never
   fitted on) are written to ``<holdout>/part-<k>.parquet`` for the label-free gate, and, for an
   adapter that trains (the MLP), the fitted pairs to ``<fit>/part-<k>-<j>.parquet`` (columns
   ``src``, ``dst``: source and target vectors, by direction) for Ray Train to stream; for
   ``ridge: auto``, a seeded tune share of the fitted pairs to ``<tune>/part-<k>.parquet`` (like
   the held-out ones; the statistics keep its pairs apart as their folds).
The statistics are merged on the driver: the fit sees every pair, whatever their number.

Galleries written file for file from one listing (``adapter pairs``, or any two embeddings of the
same sorted ids with the same rows per file) are co-partitioned: file ``i`` of each holds the same
ids. Then one pass suffices: one task per file pair reads both ids columns, and when they are
equal, the vectors, and returns the statistics (and writes the held-out pairs) straight away. If
any file pair differs, the results of that pass are dropped and the two-pass join runs (the wasted
work is a read of the ids).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dmu_ray.adapters.stats import PairStats
from dmu_ray.data.splits import unit_hash
from dmu_ray.gallery import EMB, ID, Gallery, embedding_array, embedding_matrix, write_parquet_atomic
from dmu_ray.storage import Location, write_bytes_atomic

LABEL = "label"
__all__ = ["PairCounts", "bucket_count", "gate_order", "id_keys", "join_pairs", "read_holdout"]

#: rows per file of the fitted pairs an MLP trains on (a Ray Data block each: bounded memory)
FIT_FILE_ROWS = 32_768

#: the smallest bucket the join makes to keep every CPU busy (below it, the files' fixed costs win)
MIN_BUCKET_ROWS = 65_536

#: the join's scratch files (a bucket's rows of one gallery file): Arrow IPC, uncompressed. They
#: are read once and removed; Parquet's encoding of the vector column (its list levels, a value at
#: a time) cost more than the whole rest of the pass.
SCRATCH = ".arrow"

#: seeds of the hashes of an id: its bucket, whether it is held out, whether a fitted pair is one
#: of the tune share (apart, so that each share is the same in every bucket)
BUCKET_SALT, HOLDOUT_SALT, TUNE_SALT = 0x5EED_B0C7, 0x401D_0007, 0x7E0E_0011
#: seed of the hash that orders the held-out items for the gate (:func:`gate_order`)
GATE_SALT = 0x6A7E_0D3F


@dataclass
class PairCounts:
    """What the join found: pairs matched (fitted + held out), rows of one side only."""

    matched: int = 0
    fitted: int = 0
    held_out: int = 0
    old_only: int = 0
    new_only: int = 0

    def add(self, other: PairCounts) -> PairCounts:
        return PairCounts(
            *(a + b for a, b in zip(self.__dict__.values(), other.__dict__.values(), strict=True))
        )


def id_keys(ids: np.ndarray) -> np.ndarray:
    """A uint64 key per id: the integer itself, or the first 8 bytes of a string's blake2b."""
    if ids.dtype.kind in "iu":
        return ids.astype(np.uint64)
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(s).encode(), digest_size=8).digest(), "little") for s in ids],
        dtype=np.uint64,
    )


def _bucket_file(task: dict) -> dict:
    """Stage 1 (one gallery file): its rows split into buckets, one Parquet file per bucket."""
    g, rel, side, work, buckets = task["gallery"], task["file"], task["side"], task["work"], task["buckets"]
    f = g.parquet_file(rel)
    t = f.read(columns=[ID, EMB] + ([LABEL] if LABEL in f.schema_arrow.names else []))
    ids = t.column(ID).to_numpy(zero_copy_only=False)
    which = (unit_hash(id_keys(ids), BUCKET_SALT) * buckets).astype(np.int64)
    stem = rel.replace("/", "__")
    for k in np.unique(which):
        part = t.filter(pa.array(which == k))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, part.schema) as w:
            w.write_table(part)
        write_bytes_atomic(work.join(side, f"b{k:05d}", f"{stem}{SCRATCH}"), sink.getvalue())
    return {"file": rel, "rows": t.num_rows}


def bucket_count(rows: int, bucket_rows: int, slots: float) -> int:
    """Buckets of the two-pass join: enough that none holds more than ``bucket_rows`` rows of a
    side (a join task's memory), and, where the rows allow buckets of at least
    :data:`MIN_BUCKET_ROWS`, at least as many as the cluster runs join tasks at once (``slots``),
    so that every CPU joins a share."""
    by_memory = -(-rows // bucket_rows)
    by_cpus = min(int(slots), rows // MIN_BUCKET_ROWS)
    return max(1, by_memory, by_cpus)


def _read_bucket(loc: Location, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Ids, ``(n, dim)`` vectors and labels (None: the gallery has none) of one side's rows of a
    bucket (none: empty arrays)."""
    names = loc.list_files(SCRATCH, data_only=True)
    if not names:
        return np.empty(0, np.int64), np.empty((0, dim), np.float32), None
    parts = []
    for n in names:
        with loc.fs.open_input_file(loc.join(n).path) as f:
            parts.append(pa.ipc.open_file(f).read_all())
    return _side_of(pa.concat_tables(parts))


def _join_bucket(task: dict) -> dict:
    """Stage 2 (one bucket): join old and new rows on the id; statistics of the fitted pairs,
    the held-out pairs written for the gate."""
    work, k, dims = task["work"], task["bucket"], task["dims"]
    old_side = _read_bucket(work.join("old", f"b{k:05d}"), dims[0])
    new_side = _read_bucket(work.join("new", f"b{k:05d}"), dims[1])
    return _join_rows(task, k, old_side, new_side)


def _side_of(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    labels = table.column(LABEL).fill_null(-1).to_numpy() if LABEL in table.column_names else None
    return (  # vectors at the gallery's precision: the statistics convert a chunk at a time
        table.column(ID).to_numpy(zero_copy_only=False),
        embedding_matrix(table.column(EMB)),
        labels,
    )


def _direct_pair(task: dict) -> dict | None:
    """One pass (co-partitioned galleries): file ``k`` of each read and joined, or None when the
    two files do not hold the same ids (the caller then runs the two-pass join)."""
    old, new, k = task["old"], task["new"], task["bucket"]
    fo, fn = old.parquet_file(task["files"][0]), new.parquet_file(task["files"][1])
    if fo.metadata.num_rows != fn.metadata.num_rows:
        return None
    if not np.array_equal(
        fo.read(columns=[ID]).column(ID).to_numpy(), fn.read(columns=[ID]).column(ID).to_numpy()
    ):
        return None
    sides = []
    for f in (fo, fn):
        sides.append(_side_of(f.read(columns=[ID, EMB] + ([LABEL] if LABEL in f.schema_arrow.names else []))))
    return _join_rows(task, k, sides[0], sides[1])


def _join_rows(task: dict, k: int, old_side: tuple, new_side: tuple) -> dict:
    """Join one part's old and new rows on the id: statistics of the fitted pairs; held-out (and,
    for an MLP, fitted) pairs written as part ``k``."""
    old_ids, old, old_labels = old_side
    new_ids, new, new_labels = new_side
    if np.array_equal(old_ids, new_ids):  # co-partitioned: the rows pair as they are, no copies
        ids, x, y = old_ids, old, new
        labels = old_labels if old_labels is not None else new_labels
    else:
        _, io, jn = np.intersect1d(old_ids, new_ids, assume_unique=True, return_indices=True)
        ids, x, y = old_ids[io], old[io], new[jn]
        labels = old_labels[io] if old_labels is not None else None if new_labels is None else new_labels[jn]
    keys = id_keys(ids)
    hold = unit_hash(keys, HOLDOUT_SALT + task["seed"]) < task["holdout"]
    src, dst = (x, y) if task["direction"] == "gallery" else (y, x)
    fit = ~hold
    device = "cuda" if task.get("num_gpus") else None  # on the task's GPU when it holds one
    tune = None
    if task.get("tune_loc") is not None:  # a share of the fitted pairs to choose the ridge on
        tune = fit & (unit_hash(keys, TUNE_SALT + task["seed"]) < task["tune"])
        _write_pairs(task["tune_loc"], k, ids, x, y, labels, tune)
    # zero rows give zero sums of the right shapes; with the tune share, its folds apart too
    stats = PairStats.of(src, dst, rows=fit, device=device, fold=tune)
    _write_pairs(task["holdout_loc"], k, ids, x, y, labels, hold)
    if task.get("fit_loc") is not None and fit.any():
        order = np.argsort(ids[fit], kind="stable")  # the same files whatever the read order
        xs, ys = src[fit][order].astype(np.float32), dst[fit][order].astype(np.float32)
        for j, start in enumerate(range(0, len(xs), FIT_FILE_ROWS)):
            part = slice(start, start + FIT_FILE_ROWS)
            pairs = pa.table({"src": embedding_array(xs[part]), "dst": embedding_array(ys[part])})
            write_parquet_atomic(task["fit_loc"].join(f"part-{k:05d}-{j:05d}.parquet"), pairs)
    counts = PairCounts(
        matched=len(ids),
        fitted=int(fit.sum()),
        held_out=int(hold.sum()),
        old_only=len(old_ids) - len(ids),
        new_only=len(new_ids) - len(ids),
    )
    return {"bucket": k, "counts": counts, "stats": stats}


def _write_pairs(
    loc: Location, k: int, ids: np.ndarray, x: np.ndarray, y: np.ndarray, labels, rows: np.ndarray
) -> None:
    """The pairs of ``rows`` (old and new vectors, labels when the items have them), sorted by
    id, as ``<loc>/part-<k>.parquet`` (nothing when there are none)."""
    if not rows.any():
        return
    order = np.argsort(ids[rows], kind="stable")
    cols = {
        ID: pa.array(ids[rows][order]),
        "old": embedding_array(x[rows][order].astype(np.float32)),
        "new": embedding_array(y[rows][order].astype(np.float32)),
    }
    if labels is not None:  # the gate adds labelled metrics when the items have labels
        cols[LABEL] = pa.array(labels[rows][order])
    write_parquet_atomic(loc.join(f"part-{k:05d}.parquet"), pa.table(cols))


def join_pairs(
    old: Gallery,
    new: Gallery,
    work: Location,
    holdout_loc: Location,
    *,
    direction: str,
    holdout: float,
    seed: int,
    bucket_rows: int,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    fit_loc: Location | None = None,
    tune_loc: Location | None = None,
    tune: float = 0.0,
    progress=None,
) -> tuple[PairCounts, PairStats]:
    """Join two committed galleries on their ids (see the module docstring): the counts and the
    merged statistics of the fitted pairs, source -> target by ``direction`` (gallery: old -> new;
    query: new -> old); the fitted pairs themselves are written under ``fit_loc`` when given.
    With ``num_gpus``, the tasks that compute statistics hold that share of a GPU and compute
    the products on it. With ``tune_loc``, a seeded ``tune`` share of the fitted pairs is also
    written there (like the held-out pairs) and the statistics keep it apart as their folds
    (tune pairs, the rest). Needs a Ray session."""
    import ray

    dims = (old.model.dim, new.model.dim)
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)  # the tasks that compute statistics
    scatter = ray.remote(num_cpus=num_cpus)  # the bucket pass only moves rows
    base = {
        "num_gpus": num_gpus,
        "dims": dims,
        "seed": seed,
        "holdout": holdout,
        "direction": direction,
        "holdout_loc": holdout_loc,
        "fit_loc": fit_loc,
        "tune_loc": tune_loc,
        "tune": tune,
    }
    if len(old.files) == len(new.files):  # perhaps co-partitioned: one pass, file pair by file pair
        direct = ray.get(
            [
                remote(_direct_pair).remote({**base, "old": old, "new": new, "files": pair, "bucket": k})
                for k, pair in enumerate(zip(old.files, new.files, strict=True))
            ]
        )
        if all(r is not None for r in direct):
            if progress:
                progress(f"  pairs: {len(direct)} file pair(s) holding the same ids, joined in one pass")
            return _merged(direct)
        for folder in (holdout_loc, fit_loc, tune_loc):  # what the pass wrote goes; the join rewrites it
            if folder is not None:
                for name in folder.list_files(".parquet"):
                    folder.fs.delete_file(folder.join(name).path)
    buckets = bucket_count(
        max(old.num_rows, new.num_rows), bucket_rows, ray.cluster_resources().get("CPU", 1) / num_cpus
    )
    stage1 = [
        scatter(_bucket_file).remote(
            {"gallery": g, "file": f, "side": side, "work": work, "buckets": buckets}
        )
        for side, g in (("old", old), ("new", new))
        for f in g.files
    ]
    ray.get(stage1)
    if progress:
        progress(f"  pairs: {len(stage1)} gallery file(s) split into {buckets} bucket(s)")
    results = ray.get(
        [remote(_join_bucket).remote({**base, "work": work, "bucket": k}) for k in range(buckets)]
    )
    return _merged(results)


def _merged(results: list[dict]) -> tuple[PairCounts, PairStats]:
    counts, stats = PairCounts(), None
    for r in sorted(results, key=lambda r: r["bucket"]):
        counts = counts.add(r["counts"])
        stats = r["stats"] if stats is None else stats.merge(r["stats"])
    return counts, stats


def read_holdout(
    loc: Location, limit: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, old, new)`` of the held-out pairs in the gate's order (:func:`gate_order`), the
    first ``limit`` when given."""
    ids, old, new, _ = read_holdout_labelled(loc, limit, seed)
    return ids, old, new


def gate_order(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """The order in which the gate takes held-out items: by a seeded hash of the id (ties by
    id), a uniform sample at any length whatever the ids' order. (Ids often follow a class, a
    folder or a time: the first items by id would all be of a few classes.)"""
    keys = id_keys(ids)
    return np.lexsort((keys, unit_hash(keys, GATE_SALT + seed)))


def read_holdout_labelled(
    loc: Location, limit: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`read_holdout` with the items' labels (-1: none; None when the galleries had none).
    Only the ids of every file and then the rows taken are held: the first ``limit`` of a large
    held-out share cost ``limit`` rows of memory, not the share's."""
    names = loc.list_files(".parquet", data_only=True)
    if not names:
        empty = np.empty((0, 0), np.float32)
        return np.empty(0, np.int64), empty, empty, None

    def read(name: str, columns: list[str] | None = None) -> pa.Table:
        with loc.fs.open_input_file(loc.join(name).path) as f:
            return pq.read_table(f, columns=columns)

    per_file = [read(n, [ID]).column(ID).to_numpy(zero_copy_only=False) for n in names]
    ids = np.concatenate(per_file)
    order = gate_order(ids, seed)
    if limit is not None:
        order = order[:limit]
    rank = np.full(len(ids), -1, np.int64)  # each taken row's place in the gate's order
    rank[order] = np.arange(len(order))
    parts, places, start = [], [], 0
    for name, file_ids in zip(names, per_file, strict=True):
        mine = rank[start : start + len(file_ids)]
        start += len(file_ids)
        if (mine >= 0).any():
            parts.append(read(name).filter(pa.array(mine >= 0)))
            places.append(mine[mine >= 0])
    t = pa.concat_tables(parts).take(pa.array(np.argsort(np.concatenate(places))))
    return (
        t.column(ID).to_numpy(zero_copy_only=False),
        embedding_matrix(t.column("old")).astype(np.float32),
        embedding_matrix(t.column("new")).astype(np.float32),
        t.column(LABEL).to_numpy() if LABEL in t.column_names else None,
    )
