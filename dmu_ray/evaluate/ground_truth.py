"""Ground truth of the standard benchmark protocols, read and checked before any embedding.

- **Revisited Oxford/Paris** (``revisited``): the protocol's ground-truth file, the official
  ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` or the same structure as JSON: ``imlist`` (gallery
  image names), ``qimlist`` (query names) and ``gnd``, one entry per query with the gallery
  positions that are ``easy``, ``hard`` and ``junk`` for it. Rows are matched by id: a query's id
  is its position in ``qimlist`` and a gallery image's its position in ``imlist`` (a JSON file may
  give ``query_ids`` / ``gallery_ids`` lists instead). Gallery ids outside ``imlist`` are
  distractors (the +1M sets): never relevant, never junk.
- **Templates** (``templates``, IJB-C style): a table (CSV or Parquet) of ``template,id`` with
  optional ``media``, ``subject`` and ``set``: which images (row ids) make each template. Probe
  templates (``set`` = ``probe``) are pooled from the query model's vectors, templates of any
  other set (e.g. ``G1``, ``G2``) form galleries pooled from the gallery vectors (``set`` may be
  empty for templates that only the pairs use); an optional
  pairs table ``probe,reference[,genuine]`` lists the 1:1 verification pairs (probe pooled from the
  query side, reference from the gallery side; ``genuine`` from the subjects when absent).

The pickle reader only rebuilds containers, numbers and numpy arrays: a ground-truth file cannot
run code.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dmu_ray.storage import CSV_SUFFIXES, parse_table, read_existing, resolve

__all__ = [
    "GroundTruthError",
    "RevisitedGroundTruth",
    "TemplateSets",
    "load_revisited",
    "load_templates",
    "rows_of",
]


class GroundTruthError(ValueError):
    """A ground-truth file that cannot be used; the message names the file and the problem."""


def _read(uri: str, storage: Any, what: str) -> tuple[str, bytes]:
    try:
        loc = resolve(uri, storage)
    except ValueError as err:
        raise GroundTruthError(f"{what}: {err}") from None
    try:
        return loc.uri, read_existing(loc, GroundTruthError, prefix=f"{what}: ")
    except OSError as err:
        raise GroundTruthError(f"{what}: {loc.uri}: cannot be read ({err})") from None


class _DataOnly(pickle.Unpickler):
    """Unpickles containers, numbers, strings and numpy arrays; refuses every other global."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a ground-truth file holds data only")


def _index_list(v: Any, where: str, n: int) -> np.ndarray:
    try:
        a = np.asarray(v if v is not None else [], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise GroundTruthError(f"{where}: not a list of gallery positions") from None
    if len(a) and (a.min() < 0 or a.max() >= n):
        raise GroundTruthError(
            f"{where}: position {int(a.max() if a.max() >= n else a.min())} outside imlist (0..{n - 1})"
        )
    return a


@dataclass
class RevisitedGroundTruth:
    """Per query: gallery ids that are easy / hard / junk (``easy[i]`` etc.), query ids in order."""

    uri: str
    query_ids: np.ndarray
    gallery_ids: np.ndarray
    easy: list[np.ndarray]
    hard: list[np.ndarray]
    junk: list[np.ndarray]

    def needs(self) -> tuple[np.ndarray, np.ndarray]:
        """The ids the query side and the gallery side must hold."""
        return self.query_ids, self.gallery_ids

    def settings(self) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
        """The protocol's three settings as (positives, junk) gallery ids per query: Easy = easy
        (hard ignored), Medium = easy + hard, Hard = hard (easy ignored)."""
        cat = [np.concatenate(p) for p in zip(self.easy, self.hard, strict=True)]
        return {
            "E": (self.easy, [np.concatenate(p) for p in zip(self.junk, self.hard, strict=True)]),
            "M": (cat, self.junk),
            "H": (self.hard, [np.concatenate(p) for p in zip(self.junk, self.easy, strict=True)]),
        }


def load_revisited(uri: str, storage: Any = None) -> RevisitedGroundTruth:
    """Read and check a Revisited Oxford/Paris ground-truth file (``.pkl`` or ``.json``)."""
    where, raw = _read(uri, storage, "revisited.ground_truth")
    try:
        d = json.loads(raw) if where.lower().endswith(".json") else _DataOnly(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, json.JSONDecodeError, EOFError, ValueError, TypeError) as err:
        raise GroundTruthError(f"{where}: not a readable ground-truth file ({err})") from None
    if not isinstance(d, dict):
        raise GroundTruthError(f"{where}: expected a mapping with imlist, qimlist and gnd")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in d]
    if missing:
        raise GroundTruthError(f"{where}: missing key(s) {missing} (need imlist, qimlist, gnd)")
    n_g, n_q, gnd = len(d["imlist"]), len(d["qimlist"]), d["gnd"]
    if len(gnd) != n_q:
        raise GroundTruthError(f"{where}: gnd has {len(gnd)} entries but qimlist {n_q} queries")
    lists: dict[str, list[np.ndarray]] = {"easy": [], "hard": [], "junk": []}
    for i, entry in enumerate(gnd):
        if not isinstance(entry, dict):
            raise GroundTruthError(f"{where}: gnd[{i}] is not a mapping of easy/hard/junk")
        for k in lists:
            lists[k].append(_index_list(entry.get(k), f"{where}: gnd[{i}].{k}", n_g))
    q_ids = np.asarray(d.get("query_ids", np.arange(n_q)), dtype=np.int64)
    g_ids = np.asarray(d.get("gallery_ids", np.arange(n_g)), dtype=np.int64)
    for name, ids, n in (("query_ids", q_ids, n_q), ("gallery_ids", g_ids, n_g)):
        if len(ids) != n or len(np.unique(ids)) != n:
            raise GroundTruthError(f"{where}: {name} must be {n} distinct ids, one per list entry")
    lists = {k: [g_ids[a] for a in v] for k, v in lists.items()}  # positions -> row ids
    return RevisitedGroundTruth(where, q_ids, g_ids, lists["easy"], lists["hard"], lists["junk"])


def rows_of(ids: np.ndarray, want: np.ndarray, what: str) -> np.ndarray:
    """Row positions in ``ids`` of each of ``want``; every one must be there (else an error that
    counts the missing ids and shows a few)."""
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids, want, sorter=order).clip(max=max(0, len(ids) - 1))
    rows = order[pos] if len(ids) else np.zeros(len(want), np.int64)
    found = ids[rows] == want if len(ids) else np.zeros(len(want), bool)
    if not found.all():
        miss = np.unique(want[~found])
        raise GroundTruthError(f"{what}: {len(miss)} id(s) not found, e.g. {miss[:5].tolist()}")
    return rows


@dataclass
class TemplateSets:
    """Templates: the image ids of each (``template``/``id``/``media`` arrays, one row per image),
    the subject and set of each template, and the verification pairs."""

    uri: str
    template: np.ndarray
    id: np.ndarray
    media: np.ndarray
    subjects: dict[Any, Any] | None  # template -> subject when the table gives subjects
    sets: dict[Any, str] = field(default_factory=dict)  # template -> set name
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None  # probe, reference, genuine

    def needs(self) -> tuple[np.ndarray, np.ndarray]:
        """The ids the query side and the gallery side must hold."""
        return self.query_side(), self.gallery_side()

    def probe_templates(self) -> list[Any]:
        return [t for t, s in self.sets.items() if s == "probe"]

    def gallery_sets(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for t, s in self.sets.items():
            if s != "probe":
                out.setdefault(s, []).append(t)
        return out

    def query_side(self) -> np.ndarray:
        """Image ids pooled from the query vectors (probe templates and pair probes)."""
        used = set(self.probe_templates())
        if self.pairs is not None:
            used |= set(self.pairs[0].tolist())
        return np.unique(self.id[np.isin(self.template, list(used))]) if used else np.zeros(0, np.int64)

    def gallery_side(self) -> np.ndarray:
        """Image ids pooled from the gallery vectors (gallery-set templates and pair references)."""
        used = {t for ts in self.gallery_sets().values() for t in ts}
        if self.pairs is not None:
            used |= set(self.pairs[1].tolist())
        return np.unique(self.id[np.isin(self.template, list(used))]) if used else np.zeros(0, np.int64)

    def pool(self, templates: list[Any], ids: np.ndarray, vectors: np.ndarray, what: str) -> np.ndarray:
        """Unit-norm template vectors: image vectors (normalised) averaged within each media, the
        media means averaged, the result normalised (the usual IJB-C pooling)."""
        tpl = np.asarray(templates)
        keep = np.isin(self.template, tpl)
        t_of, img, med = self.template[keep], self.id[keep], self.media[keep]
        x = vectors[rows_of(ids, img, what)].astype(np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        tpos = rows_of(tpl, t_of, what)  # each image's template index in ``templates``
        keys = np.stack([tpos, np.unique(med, return_inverse=True)[1]], axis=1)
        groups, inv = np.unique(keys, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        media_sum = np.zeros((len(groups), x.shape[1]), np.float32)
        np.add.at(media_sum, inv, x)
        media_mean = media_sum / np.bincount(inv, minlength=len(groups))[:, None]
        out = np.zeros((len(tpl), x.shape[1]), np.float32)
        np.add.at(out, groups[:, 0], media_mean)
        empty = ~np.isin(np.arange(len(tpl)), groups[:, 0])
        if empty.any():
            raise GroundTruthError(f"{what}: template(s) {tpl[empty][:5].tolist()} have no images")
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def subject_of(self, templates: list[Any], ids: np.ndarray, labels: np.ndarray, what: str) -> np.ndarray:
        """Each template's subject: the table's ``subject``, else its images' label (one label
        per template, checked)."""
        if self.subjects is not None:
            return np.asarray([self.subjects[t] for t in templates])
        out = []
        for t in templates:
            lab = np.unique(labels[rows_of(ids, self.id[self.template == t], what)])
            if len(lab) != 1:
                raise GroundTruthError(
                    f"{what}: template {t!r} has images of {len(lab)} labels {lab[:5].tolist()}; give a subject column"
                )
            out.append(lab[0])
        return np.asarray(out)


def _table(uri: str, storage: Any, what: str):
    import pyarrow as pa

    where, raw = _read(uri, storage, what)
    try:
        return where, parse_table(raw, where, csv_suffixes=(*CSV_SUFFIXES, ".txt"))
    except (pa.ArrowInvalid, OSError) as err:
        raise GroundTruthError(f"{what}: {where}: not a readable Parquet/CSV table ({err})") from None


def _column(t, name: str, where: str, *, integer: bool = False) -> np.ndarray:
    import pyarrow as pa

    col = t.column(name)
    if col.null_count:
        raise GroundTruthError(f"{where}: column {name} has {col.null_count} empty value(s)")
    if integer and not pa.types.is_integer(col.type):
        raise GroundTruthError(f"{where}: column {name} must be integers (got {col.type})")
    return col.to_numpy(zero_copy_only=False)


def load_templates(uri: str, pairs: str | None = None, storage: Any = None) -> TemplateSets:
    """Read and check a template table and, when given, its verification pairs."""
    where, t = _table(uri, storage, "templates.table")
    missing = [c for c in ("template", "id") if c not in t.column_names]
    if missing:
        raise GroundTruthError(
            f"{where}: missing column(s) {missing} (need template,id[,media,subject,set]; has {t.column_names})"
        )
    if t.num_rows == 0:
        raise GroundTruthError(f"{where}: the table has no rows")
    tpl, ids = _column(t, "template", where), _column(t, "id", where, integer=True).astype(np.int64)
    media = _column(t, "media", where) if "media" in t.column_names else np.arange(len(ids))
    dup = np.unique(np.stack([np.unique(tpl, return_inverse=True)[1].reshape(-1), ids], 1), axis=0)
    if len(dup) != len(ids):
        raise GroundTruthError(f"{where}: an image id is listed twice in the same template")

    def per_template(col: str, empty_ok: bool = False) -> dict[Any, Any] | None:
        if col not in t.column_names:
            return None
        vals = t.column(col).to_pylist() if empty_ok else _column(t, col, where).tolist()
        out: dict[Any, Any] = {}
        for k, v in zip(tpl.tolist(), vals, strict=True):
            if v is None:  # a template outside every set (used by the 1:1 pairs only)
                continue
            if out.setdefault(k, v) != v:
                raise GroundTruthError(f"{where}: template {k!r} has more than one {col} ({out[k]!r}, {v!r})")
        return out

    subjects = per_template("subject")
    sets = {k: str(v) for k, v in (per_template("set", empty_ok=True) or {}).items()}
    ts = TemplateSets(where, tpl, ids, media, subjects, sets)
    if sets and not ts.probe_templates():
        raise GroundTruthError(
            f"{where}: column set names no 'probe' templates (1:N needs probes and a gallery set)"
        )
    if sets and not ts.gallery_sets():
        raise GroundTruthError(f"{where}: column set names only probes; 1:N needs a gallery set (e.g. G1)")
    if pairs is not None:
        pwhere, p = _table(pairs, storage, "templates.pairs")
        missing = [c for c in ("probe", "reference") if c not in p.column_names]
        if missing:
            raise GroundTruthError(
                f"{pwhere}: missing column(s) {missing} (need probe,reference[,genuine]; has {p.column_names})"
            )
        a, b = _column(p, "probe", pwhere), _column(p, "reference", pwhere)
        known = set(tpl.tolist())
        unknown = sorted({x for x in [*a.tolist(), *b.tolist()] if x not in known}, key=str)
        if unknown:
            raise GroundTruthError(f"{pwhere}: {len(unknown)} template(s) not in {where}, e.g. {unknown[:5]}")
        genuine = _column(p, "genuine", pwhere).astype(bool) if "genuine" in p.column_names else None
        ts.pairs = (a, b, genuine)
    if not sets and pairs is None:
        raise GroundTruthError(
            f"{where}: neither a set column (1:N) nor templates.pairs (1:1): nothing to measure"
        )
    return ts
