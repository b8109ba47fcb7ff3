"""Nearest-neighbour search with faiss: inner product on unit vectors (= cosine).

Exact (``IndexFlatIP``) up to ``exact_max`` gallery vectors, IVF (optionally IVF-PQ) above it; the
IVF path measures its own recall against exact search on a sample of queries, so the report can
say what approximation cost. A GPU index is used when faiss sees a GPU (faiss-gpu build), the CPU
index otherwise; both go through the same calls. Queries run in batches (bounded memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


@dataclass
class SearchConfig:
    exact_max: int = 2_000_000  # exact 1M x 128 with 10k queries: ~11 s on 2 cores (docs/benchmarks.md)
    nlist: int | None = None  # default: 4 * sqrt(n)
    nprobe: int = 16
    pq_m: int | None = None  # sub-quantizers for IVF-PQ (None: IVF-Flat)
    query_batch: int = 4096
    use_gpu: bool | None = None  # None: when faiss sees a GPU
    recall_sample: int = 1000


@dataclass
class SearchResult:
    scores: np.ndarray  # (n_query, k) float32
    ids: np.ndarray  # (n_query, k) int64 gallery row indices, -1 where fewer than k
    index: str  # "flat", "ivf<nlist>,nprobe<p>" ...
    recall_vs_exact: float | None  # IVF only: recall@k of the approximate neighbours


def _gpu(use_gpu: bool | None) -> bool:
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return bool(n) if use_gpu is None else (use_gpu and n > 0)


def build_index(xb: np.ndarray, cfg: SearchConfig) -> tuple[faiss.Index, str]:
    """An index over gallery vectors ``xb`` (n, d) float32, C-contiguous."""
    n, d = xb.shape
    if n <= cfg.exact_max:
        index, name = faiss.IndexFlatIP(d), "flat"
    else:
        nlist = cfg.nlist or int(4 * np.sqrt(n))
        quantizer = faiss.IndexFlatIP(d)
        if cfg.pq_m:
            index = faiss.IndexIVFPQ(quantizer, d, nlist, cfg.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
            name = f"ivf{nlist},pq{cfg.pq_m}"
        else:
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            name = f"ivf{nlist}"
        rng = np.random.default_rng(0)
        train = xb[rng.choice(n, size=min(n, nlist * 64), replace=False)]
        index.train(train)
        index.nprobe = cfg.nprobe
        name += f",nprobe{cfg.nprobe}"
    if _gpu(cfg.use_gpu):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        name += ",gpu"
    index.add(xb)
    return index, name


def _batched(index: faiss.Index, xq: np.ndarray, k: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    D = np.empty((len(xq), k), dtype=np.float32)
    I = np.empty((len(xq), k), dtype=np.int64)  # noqa: E741
    for s in range(0, len(xq), batch):
        D[s : s + batch], I[s : s + batch] = index.search(xq[s : s + batch], k)
    return D, I


def search(xq: np.ndarray, xb: np.ndarray, k: int, cfg: SearchConfig | None = None) -> SearchResult:
    """Top-``k`` gallery rows for each query by inner product."""
    cfg = cfg or SearchConfig()
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    k = min(k, len(xb))
    index, name = build_index(xb, cfg)
    D, I = _batched(index, xq, k, cfg.query_batch)  # noqa: E741
    recall = None
    if name != "flat" and not name.startswith("flat"):
        m = min(len(xq), cfg.recall_sample)
        exact = faiss.IndexFlatIP(xb.shape[1])
        exact.add(xb)
        _, ref = _batched(exact, xq[:m], k, cfg.query_batch)
        recall = float(np.mean([len(np.intersect1d(I[i], ref[i])) / k for i in range(m)]))
    return SearchResult(D, I, name, recall)
