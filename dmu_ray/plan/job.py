"""``dmu-ray plan``: every upgrade path's worker-hours, wall time, money and measured quality,
from a bench JSON (:mod:`dmu_ray.plan.bench`) and the evaluations already run.

Quality is a share of the full re-embedding's (new/new = 1): the labelled ``metric`` of a pairing
over new/new's, from eval.json, a backfill curve or a gate's labelled figures; failing those, the
gate's label-free share of new/new's top-k (said so beside the figure). Evidence is taken only
when it was measured with the artefacts the bench timed (sha256); anything else is refused.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

from dmu_ray.plan.bench import BenchError, read_bench
from dmu_ray.plan.config import PlanConfig
from dmu_ray.plan.costs import Path, Work, best_within, cheapest_reaching, costed, pareto_front
from dmu_ray.storage import read_bytes, resolve, write_bytes_atomic

__all__ = ["PlanError", "run_plan", "plan_sentences"]

FORMAT = "dmu-ray.plan/1"


class PlanError(ValueError):
    """Plan inputs that do not fit together (named), before anything is computed."""


def _json(uri: str, what: str, storage) -> dict[str, Any]:
    try:
        d = json.loads(read_bytes(resolve(uri, storage)))
    except FileNotFoundError:
        raise PlanError(f"{what} {uri}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlanError(f"{what} {uri}: not JSON ({err})") from None
    if not isinstance(d, dict):
        raise PlanError(f"{what} {uri}: not a JSON object")
    return d


def _sha(bench: dict[str, Any], role: str) -> str | None:
    a = bench.get("artifacts", {}).get(role)
    return a.get("sha256") if isinstance(a, dict) else None


def _check_named(cfg: PlanConfig, bench: dict[str, Any]) -> None:
    """The plan's named artefacts are the ones the bench measured."""
    from dmu_ray.models.artifact import artifact_sha256

    for field, role in (("new_model", "new_model"), ("upgrade", "upgrade")):
        uri = getattr(cfg, field)
        if uri is None:
            continue
        have = _sha(bench, role)
        if have is None:
            raise PlanError(
                f"{field}: {uri} is named, but the bench {cfg.bench} measured no {role} (its {role} section)"
            )
        if artifact_sha256(uri, cfg.storage) != have:
            ident = bench["artifacts"][role]["ident"]
            raise PlanError(
                f"{field}: {uri} is not what the bench measured ({ident}); re-run dmu-ray bench with it"
            )


def _gallery(cfg: PlanConfig, bench: dict[str, Any]) -> tuple[int, int | None]:
    g = cfg.gallery
    rows, dim = g.rows, g.dim
    if g.uri is not None:
        from dmu_ray.gallery import Gallery

        opened = Gallery.open(g.uri, cfg.storage)
        rows, dim = opened.manifest.rows, dim or opened.model.dim
    measured = bench.get("figures", {}).get("refresh", {}).get("dim")
    if dim is not None and measured is not None and dim != measured:
        raise PlanError(
            f"gallery.dim: the gallery is {dim}-d, but the bench's refresh was measured on {measured}-d vectors "
            "(a refresh's rate depends on it): bench a gallery of the same dimension"
        )
    assert rows is not None
    return rows, dim


class _Evidence:
    """The quality of each pairing / strategy, from the evidence files, checked against the bench."""

    def __init__(self, cfg: PlanConfig, bench: dict[str, Any]) -> None:
        self.cfg, self.bench, self.metric = cfg, bench, cfg.metric
        self.found: dict[str, tuple[float, float | None, str]] = {}  # strategy -> (share, value, source)
        ev = cfg.evidence
        if ev.eval is not None:
            self._eval(ev.eval)
        if ev.backfill_curve is not None:
            self._curve(ev.backfill_curve)
        for g in ev.gates:
            self._gate(g)

    def _put(self, key: str, share: float, value: float | None, source: str) -> None:
        self.found.setdefault(key, (share, value, source))  # the first (most direct) evidence wins

    def _eval(self, uri: str) -> None:
        d = _json(uri, "evidence.eval", self.cfg.storage)
        arts = d.get("artifacts")
        if not isinstance(arts, dict):
            raise PlanError(
                f"evidence.eval {uri}: it does not record the artefacts it evaluated (written by an older dmu-ray?); "
                "re-run dmu-ray evaluate"
            )
        models = arts.get("models", {})
        want = _sha(self.bench, "new_model")
        if self.cfg.evidence.eval_model is not None:
            name = self.cfg.evidence.eval_model
            if name not in models:
                raise PlanError(f"evidence.eval_model: {name!r} is not in {uri} (it has {', '.join(models)})")
        else:
            if want is None and len(models) > 1:
                raise PlanError(
                    f"evidence.eval {uri} evaluates several new models ({', '.join(models)}) and the bench measured "
                    "none: name the one the plan is for in evidence.eval_model"
                )
            names = (
                [n for n, m in models.items() if m.get("model", {}).get("sha256") == want]
                if want
                else list(models)
            )
            if not names:
                raise PlanError(
                    f"evidence.eval {uri}: none of its new models ({', '.join(models)}) is the model the bench "
                    f"measured ({self.bench['artifacts']['new_model']['ident']}); evaluate that model"
                )
            name = names[0]
        m = models[name]
        if want is not None and m.get("model", {}).get("sha256") != want:
            raise PlanError(
                f"evidence.eval {uri}: model {name!r} ({m['model']['id']}) is not the model the bench measured "
                f"({self.bench['artifacts']['new_model']['ident']})"
            )
        up, have_up = _sha(self.bench, "upgrade"), (m.get("upgrade_module") or {}).get("sha256")
        by = m.get("upgraded_by")  # a stored upgraded gallery's module: id@sha256[:12]
        if have_up is None and by and up is not None and str(by).endswith("@" + up[:12]):
            have_up = up
        elif have_up is None and by:
            have_up = f"other: {by}"
        if up is not None and have_up is not None and have_up != up:
            raise PlanError(
                f"evidence.eval {uri}: model {name!r} was evaluated with upgrade module "
                f"{(m.get('upgrade_module') or {}).get('id') or by}, not the one the bench measured "
                f"({self.bench['artifacts']['upgrade']['ident']})"
            )
        qa, have_qa = _sha(self.bench, "query_adapter"), (m.get("query_adapter") or {}).get("sha256")
        if qa is not None and have_qa is not None and have_qa != qa:
            raise PlanError(
                f"evidence.eval {uri}: model {name!r} was evaluated with another query adapter than the bench's"
            )
        pairings = d.get("models", {}).get(name, {}).get("pairings", {})
        base = pairings.get("new/new", {}).get(self.metric)
        if not base:
            raise PlanError(
                f"evidence.eval {uri}: no new/new {self.metric} for model {name!r} (metric: names what it has?)"
            )
        for p in ("old/old", "new/old", "new/upgraded", "adapted/old"):
            v = pairings.get(p, {}).get(self.metric)
            if (
                v is not None
                and (p != "new/upgraded" or have_up is not None)
                and (p != "adapted/old" or have_qa is not None)
            ):
                self._put(p, v / base, v, f"{p} {self.metric} / new/new's ({uri})")
        self._put("new/new", 1.0, base, f"new/new {self.metric} ({uri})")

    def _curve(self, uri: str) -> None:
        d = _json(uri, "evidence.backfill_curve", self.cfg.storage)
        inputs = d.get("inputs", {})
        for role, key in (("upgrade", "module"), ("new_model", "new_model")):
            sha = _sha(self.bench, role)
            got = str(inputs.get(key, ""))
            if sha is not None and not got.endswith("@" + sha[:12]):
                raise PlanError(
                    f"evidence.backfill_curve {uri}: its {key} is {got}, not what the bench measured "
                    f"({self.bench['artifacts'][role]['ident']})"
                )
        if d.get("metric") != self.metric:
            raise PlanError(
                f"evidence.backfill_curve {uri}: its metric is {d.get('metric')}, the plan's {self.metric}"
            )
        fr = list(d.get("fractions", []))
        base = self.found.get("new/new", (None, None, ""))[1]
        for policy, values in d.get("curves", {}).items():
            top = values[fr.index(1.0)] if 1.0 in fr else base
            if not top:
                raise PlanError(
                    f"evidence.backfill_curve {uri}: no fraction 1.0 and no eval.json for new/new's {self.metric}"
                )
            for f, v in zip(fr, values, strict=True):
                if 0 < f < 1:
                    self._put(
                        f"backfill {f:.0%} ({policy})", v / top, v, f"backfill curve, {policy} order ({uri})"
                    )

    def _gate(self, uri: str) -> None:
        d = _json(uri, "evidence.gates", self.cfg.storage)
        if "gate" not in d or "adapter" not in d:
            raise PlanError(f"evidence.gates {uri}: not a gate.json of dmu-ray adapter fit")
        side = d.get("direction", "gallery")
        role = "upgrade" if side == "gallery" else "query_adapter"
        sha = _sha(self.bench, role)
        if sha is None:
            raise PlanError(
                f"evidence.gates {uri}: a {side}-side adapter's gate, but the bench has no {role} figure for it"
            )
        if d["adapter"].get("sha256") != sha:
            raise PlanError(
                f"evidence.gates {uri}: gates adapter {d['adapter'].get('ident')}, not the one the bench measured "
                f"({self.bench['artifacts'][role]['ident']})"
            )
        g = d["gate"]
        labelled = g.get("labelled") or {}
        base = labelled.get("new/new", {}).get(self.metric)
        for strategy, share in g.get("share", {}).items():
            v = labelled.get(strategy, {}).get(self.metric)
            if base and v is not None:
                self._put(
                    strategy,
                    v / base,
                    v,
                    f"gate: {strategy} {self.metric} / new/new's, labelled held-out pairs ({uri})",
                )
            else:
                self._put(
                    strategy, share, None, f"gate: label-free share of new/new's top-{g.get('k')} ({uri})"
                )

    def quality(self, key: str, how: str) -> tuple[float | None, float | None, str]:
        if key in self.found:
            return self.found[key]
        return None, None, f"no evidence: {how}"


def _paths(cfg: PlanConfig, bench: dict[str, Any], rows: int, ev: _Evidence) -> list[Path]:
    figs, kind = bench.get("figures", {}), bench.get("workers", {}).get("kind", "cpu")

    def work(fig: str, what: str, items: float) -> tuple[list[Work], list[str]]:
        if fig not in figs:
            return [], [f"bench figure {fig!r} (run dmu-ray bench with a {fig} section)"]
        return [Work(what, items, float(figs[fig]["per_worker"]), kind)], []

    train: list[Work] = []
    missing_train: list[str] = []
    if cfg.training is not None:
        train, missing_train = work(
            "train",
            f"train the new model: {cfg.training.epochs:g} epochs of {cfg.training.images:,} images",
            cfg.training.images * cfg.training.epochs,
        )
    paths = []

    def add(
        name: str,
        desc: str,
        key: str,
        how: str,
        parts: list[tuple[list[Work], list[str]]],
        fraction=None,
        trained=True,
    ):
        q, v, src = ev.quality(key, how)
        w = [x for p in parts for x in p[0]] + (train if trained else [])
        miss = [x for p in parts for x in p[1]] + (missing_train if trained else [])
        paths.append(Path(name, desc, w, q, v, src, miss, fraction))

    add(
        "keep",
        "keep the old model and gallery (no upgrade)",
        "old/old",
        "dmu-ray evaluate (old/old)",
        [],
        trained=False,
    )
    add(
        "re-embed",
        f"re-embed all {rows:,} gallery items with the new model",
        "new/new",
        "",
        [work("embed", f"embed {rows:,} images", rows)],
    )
    paths[-1].quality = 1.0 if paths[-1].quality is None else paths[-1].quality
    if paths[-1].evidence.startswith("no evidence"):
        paths[-1].evidence = "1 by definition (new/new)"
    add(
        "new-queries",
        "new-model queries on the untouched old gallery (a compatible new model)",
        "new/old",
        "dmu-ray evaluate (new/old) of a model trained with a compatibility loss",
        [],
    )
    if "refresh" in figs or "new/upgraded" in ev.found or _sha(bench, "upgrade"):
        add(
            "refresh",
            f"refresh all {rows:,} old vectors with the upgrade module / adapter",
            "new/upgraded",
            "dmu-ray evaluate with the upgrade module, or the gate of dmu-ray adapter fit",
            [work("refresh", f"refresh {rows:,} rows", rows)],
        )
    if "query" in figs or "adapted/old" in ev.found:
        add(
            "query-adapter",
            f"map {cfg.queries:,} new-model queries into the old space; the gallery stays",
            "adapted/old",
            "the gate of dmu-ray adapter fit with direction: query",
            [work("query", f"map {cfg.queries:,} queries", cfg.queries)],
        )
    for key in sorted(k for k in ev.found if k.startswith("backfill ")):
        f = float(key.split()[1].rstrip("%")) / 100
        add(
            f"refresh+{key}",
            f"refresh all rows, then re-embed {f:.0%} of them ({key.split('(')[1].rstrip(')')} order)",
            key,
            "",
            [
                work("refresh", f"refresh {rows:,} rows", rows),
                work("embed", f"embed {round(f * rows):,} images", f * rows),
            ],
            fraction=f,
        )
    return paths


def run_plan(cfg: PlanConfig) -> dict[str, Any]:
    """Check every input, cost every path, choose, and write plan.json, plan.md and plan.png."""
    try:
        bench = read_bench(cfg.bench, cfg.storage)
    except BenchError as err:
        raise PlanError(f"bench: {err}") from None
    _check_named(cfg, bench)
    rows, dim = _gallery(cfg, bench)
    ev = _Evidence(cfg, bench)
    prices = {"cpu": cfg.prices.cpu_worker_hour, "gpu": cfg.prices.gpu_worker_hour}
    c = cfg.cluster
    table = [
        costed(p, prices, workers=c.workers, deadline_hours=c.deadline_hours)
        for p in _paths(cfg, bench, rows, ev)
    ]
    result = {
        "format": FORMAT,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gallery": {"rows": rows, "dim": dim, "dtype": cfg.gallery.dtype},
        "bench": {
            "file": cfg.bench,
            "created_at": bench.get("created_at"),
            "workers": bench.get("workers"),
            "figures": {k: v.get("per_worker") for k, v in bench.get("figures", {}).items()},
        },
        "prices": cfg.prices.model_dump(),
        "cluster": c.model_dump(),
        "metric": cfg.metric,
        "paths": table,
        "pareto": pareto_front(table),
        "floor": cfg.floor,
        "cheapest_reaching_floor": cheapest_reaching(table, cfg.floor) if cfg.floor is not None else None,
        "budget": cfg.budget,
        "best_within_budget": best_within(table, cfg.budget) if cfg.budget is not None else None,
    }
    result["sentences"] = plan_sentences(result)
    out = resolve(cfg.output, cfg.storage)
    md = _markdown(result)
    write_bytes_atomic(out.join("plan.json"), json.dumps(result, indent=2).encode())
    write_bytes_atomic(out.join("plan.md"), md.encode())
    write_bytes_atomic(out.join("plan.png"), _plot(result))
    result["files"] = {n: out.join(n).uri for n in ("plan.json", "plan.md", "plan.png")}
    return result


def _hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.1f} min"
    if h < 48:
        return f"{h:.1f} h"
    return f"{h / 24:.1f} days"


def _money(x: float, cur: str) -> str:
    return f"{x:,.2f} {cur}" if x < 100 else f"{x:,.0f} {cur}"


def plan_sentences(result: dict[str, Any]) -> list[str]:
    """The plan in plain sentences: each costed path, then the choices."""
    cur, out = result["prices"]["currency"], []
    for r in result["paths"]:
        if r["money"] is None:
            out.append(f"{r['description']}: not costed, needs {'; '.join(r['missing'])}.")
            continue
        q = (
            f"quality not measured ({r['evidence'].removeprefix('no evidence: ')} measures it)"
            if r["quality"] is None
            else f"{r['quality']:.0%} of a full re-embedding's {result['metric']}"
        )
        cost = (
            "nothing to run"
            if r["worker_hours"] == 0
            else f"{r['worker_hours']:,.1f} worker-hours, {_hours(r['wall_hours'])} on {r['workers']} workers, "
            f"{_money(r['money'], cur)}"
        )
        trained = sum(w["worker_hours"] for w in r["work"] if w["what"].startswith("train "))
        if trained and r["worker_hours"]:
            cost += f" (training the new model: {trained:,.1f} of the worker-hours)"
        out.append(f"{r['description']}: {cost}; {q}.")
    if result["floor"] is not None:
        best = result["cheapest_reaching_floor"]
        out.append(
            f"Cheapest path reaching {result['floor']:.0%}: {best}."
            if best
            else f"No measured path reaches {result['floor']:.0%}."
        )
    if result["budget"] is not None:
        best = result["best_within_budget"]
        b = _money(result["budget"], cur)
        out.append(f"Best quality within {b}: {best}." if best else f"No costed path fits within {b}.")
    return out


def _markdown(result: dict[str, Any]) -> str:
    cur = result["prices"]["currency"]
    g = result["gallery"]
    lines = [
        f"# Upgrade plan: {g['rows']:,} rows" + (f" x {g['dim']}" if g["dim"] else "") + f" {g['dtype']}",
        "",
        f"Bench: {result['bench']['file']} ({result['bench']['created_at']}), per-worker figures "
        + ", ".join(f"{k} {v:,.1f}/s" for k, v in result["bench"]["figures"].items() if v is not None)
        + f"; prices per worker-hour: CPU {result['prices']['cpu_worker_hour']:g}, GPU {result['prices']['gpu_worker_hour']:g} {cur}.",
        "",
        f"| path | worker-hours | wall | workers | {cur} | quality (share of re-embedding) | Pareto | evidence |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["paths"]:
        wh = "-" if r["worker_hours"] is None else f"{r['worker_hours']:,.1f}"
        wall = "-" if r["wall_hours"] is None else _hours(r["wall_hours"])
        money = "-" if r["money"] is None else _money(r["money"], "").strip()
        q = "-" if r["quality"] is None else f"{r['quality']:.1%}"
        ev = r["evidence"] if not r["missing"] else r["evidence"] + "; cost needs " + "; ".join(r["missing"])
        lines.append(
            f"| {r['name']} | {wh} | {wall} | {r['workers'] if r['workers'] is not None else '-'} | {money} | {q} | "
            f"{'yes' if r['name'] in result['pareto'] else ''} | {ev} |"
        )
    lines += ["", "## What it says", ""] + [f"- {s}" for s in result["sentences"]]
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["paths"] if r["money"] is not None and r["quality"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    front = {n: i for i, n in enumerate(result["pareto"])}
    for r in rows:
        on = r["name"] in front
        ax.scatter([r["money"]], [r["quality"]], color="tab:green" if on else "tab:gray", zorder=3)
        ax.annotate(
            r["name"], (r["money"], r["quality"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    pts = sorted((r["money"], r["quality"]) for r in rows if r["name"] in front)
    if pts:
        ax.step(
            [p[0] for p in pts], [p[1] for p in pts], where="post", color="tab:green", label="Pareto front"
        )
    if result["floor"] is not None:
        ax.axhline(result["floor"], color="tab:red", ls="--", lw=1, label=f"floor {result['floor']:.0%}")
    if result["budget"] is not None:
        ax.axvline(result["budget"], color="tab:blue", ls=":", lw=1, label="budget")
    if any(r["money"] > 0 for r in rows):
        ax.set_xscale(
            "symlog", linthresh=max(1e-3, min((r["money"] for r in rows if r["money"] > 0), default=1))
        )
    ax.set_xlabel(f"money ({result['prices']['currency']})")
    ax.set_ylabel(f"share of re-embedding's {result['metric']}")
    ax.set_title(f"upgrade paths for {result['gallery']['rows']:,} rows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
