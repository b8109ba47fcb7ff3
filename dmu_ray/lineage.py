"""Lineage: the chain of models and upgrade modules that produced each gallery vector.

A *step* is a JSON dict: ``{"op": "embed", "artifact": "v1@3f2a...", "sha256": ..., "space": S}``
(a model embedded the images), ``{"op": "import", "artifact": None, "space": "prod-r50"}``
(vectors imported under a model id dmu-ray cannot verify) or ``{"op": "upgrade", "artifact":
"v2-psi@...", "sha256": ..., "from": S1, "space": S2}`` (an upgrade module applied). A *chain* is
the list of steps from the first vector to the stored one; its *space* is its last step's.

A *space* is named by the model that defines it: the artefact ident ``id@sha12`` when known, a
bare model id otherwise (imported galleries, upgrade modules exported before their target's
sha256 was recorded). Two spaces are the same when their idents are equal; when one side is a
bare id, their ids must be equal (the person's declaration, taken on trust).

Every file's ``dmu.model`` lists the gallery's chains by key (:func:`chain_key`); a gallery
whose rows have different chains also carries :data:`LINEAGE_COLUMN`, one key per row. A refresh
routes each row along the modules from its chain's space to the target space
(:func:`plan_routes`); rows with no path make it refuse before any work.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LINEAGE_COLUMN",
    "LineageError",
    "Step",
    "Chain",
    "chain_key",
    "embed_step",
    "import_step",
    "upgrade_step",
    "chain_space",
    "same_space",
    "space_id",
    "Hop",
    "plan_routes",
    "describe_chain",
]

LINEAGE_COLUMN = "_dmu_lineage"
Step = dict[str, Any]
Chain = list[Step]


class LineageError(ValueError):
    """Rows whose history does not lead to where they are asked to go."""


def embed_step(ident: str, sha256: str | None) -> Step:
    """A model artefact (``id@sha12``) embedded the images."""
    return {"op": "embed", "artifact": ident, "sha256": sha256, "space": ident}


def import_step(model_id: str, version: str | None = None) -> Step:
    """Vectors imported under ``model_id``: their space is the id the person gave."""
    return {"op": "import", "artifact": None, "version": version, "space": model_id}


def upgrade_step(ident: str, sha256: str | None, source: str | None, target: str) -> Step:
    """Upgrade module ``ident`` mapped vectors of space ``source`` (None: not recorded) to ``target``."""
    return {"op": "upgrade", "artifact": ident, "sha256": sha256, "from": source, "space": target}


def _label(step: Step) -> str:
    return str(step.get("artifact") or step.get("space"))


def chain_key(chain: Chain) -> str:
    """A chain's key: its steps' artefact idents (or the imported model id) joined by ``>``."""
    return ">".join(_label(s) for s in chain)


def chain_space(chain: Chain) -> str:
    return str(chain[-1]["space"])


def space_id(space: str) -> str:
    """The model id part of a space name (``v2@3f2a...`` -> ``v2``)."""
    return space.rsplit("@", 1)[0]


def same_space(a: str | None, b: str | None) -> bool:
    """Whether two space names are the same space (see the module docstring)."""
    if a is None or b is None:
        return False
    if a == b:
        return True
    if "@" in a and "@" in b:
        return False
    return space_id(a) == space_id(b)


def describe_chain(chain: Chain) -> str:
    """One line for people: ``embed v1@.. -> psi12@.. -> psi23@..``."""
    return " -> ".join(f"{s['op']} {_label(s)}" for s in chain)


class Hop:
    """One upgrade module as a routing edge: where it reads from (None: not recorded) and to."""

    def __init__(self, name: str, source: str | None, target: str) -> None:
        self.name, self.source, self.target = name, source, target


def plan_routes(chains: dict[str, Chain], hops: list[Hop], target: str) -> dict[str, list[int]]:
    """For every chain, the hops (indices into ``hops``) that take its space to ``target``: an
    empty list for a chain already there. Raises
    :class:`LineageError` naming every chain without a path. Hops that record nothing apply, in
    the order given, to a gallery of one chain (on trust, as before lineage was recorded)."""
    if len(chains) == 1 and hops and all(h.source is None for h in hops):
        return {next(iter(chains)): list(range(len(hops)))}  # nothing recorded: the given order
    routes: dict[str, list[int]] = {}
    missing = []
    for key, chain in chains.items():
        path = _shortest_path(chain_space(chain), hops, target)
        if path is None:
            missing.append(f"{key} (in space {chain_space(chain)})")
        else:
            routes[key] = path
    if missing:
        known = ", ".join(f"{h.name}: {h.source or '?'} -> {h.target}" for h in hops)
        raise LineageError(
            f"no chain of the given upgrade modules leads to {target} from: {'; '.join(missing)} "
            f"(modules: {known})"
        )
    return routes


def _shortest_path(start: str, hops: list[Hop], target: str) -> list[int] | None:
    """Breadth-first over the hops from ``start``; each hop is used at most once."""
    if same_space(start, target):
        return []
    frontier: list[tuple[str, list[int]]] = [(start, [])]
    while frontier:
        nxt = []
        for space, path in frontier:
            for i, h in enumerate(hops):
                if i in path or not same_space(space, h.source):
                    continue
                if same_space(h.target, target):
                    return [*path, i]
                nxt.append((h.target, [*path, i]))
        frontier = nxt
    return None
