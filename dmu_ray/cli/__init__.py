"""``dmu-ray <command>``: the command line over the library, one module per command group
(``cli/gallery.py``, ``cli/data.py``, ...: each adds its sub-parsers and handlers); this module
assembles them in order and runs one.

Exit codes: 0 success, 1 the checked thing is bad (e.g. ``gallery validate`` found problems),
2 bad input (config, arguments, gallery contract), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import traceback
from collections.abc import Sequence

from dmu_ray import __version__
from dmu_ray.cli import adapter, data, evaluate, gallery, lifecycle, model, plan, refresh, submit, train
from dmu_ray.cli.common import _err
from dmu_ray.schema import ConfigError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The ``dmu-ray`` argument parser. Name lists (data sets, variants, splits, jobs) come from
    the registries and configs that define them."""
    p = argparse.ArgumentParser(
        prog="dmu-ray", description="Darwinian Model Upgrades on Ray: train, refresh, evaluate."
    )
    p.add_argument("--version", action="version", version=f"dmu-ray {__version__}")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray's own logs (driver INFO lines, worker and actor output); default: errors only",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (
        gallery,
        model,
        data,
        train,
        evaluate,
        lifecycle,
        submit,
        refresh,
        adapter,
        plan,
    ):  # help's order
        group.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dmu-ray`` console script."""
    from dmu_ray.gallery import GalleryError
    from dmu_ray.ray_session import QUIET_ENV, VERBOSE_ENV, cause_line, from_ray, ray_logs_dir, root_cause

    ns = build_parser().parse_args(argv)
    if ns.verbose:
        os.environ[VERBOSE_ENV] = "1"
    if getattr(ns, "quiet", False):
        os.environ[QUIET_ENV] = "1"
    bad_input = (ConfigError, GalleryError, ValueError, FileNotFoundError, OSError)
    try:
        return int(ns.func(ns) or 0)
    except Exception as err:
        if isinstance(err, bad_input) and not from_ray(err):  # raised here, worded for the user
            _err(str(err))
            return 2
        name, _, cause = root_cause(err)
        # a failure in a Ray task or actor (or anywhere else): its cause in one line, then where
        # the full logs are; the traceback only with --verbose
        if ns.verbose:
            traceback.print_exc()
        _err(cause_line(err))
        logs, hint = ray_logs_dir(), "" if ns.verbose else " (--verbose shows the traceback here)"
        _err(f"Ray's full logs: {logs}{hint}" if logs else f"failed{hint}")
        # bad input found by a worker (dmu-ray's own errors are about their input) is exit 2
        return 2 if isinstance(cause, bad_input) or name.startswith("dmu_ray.") else 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
