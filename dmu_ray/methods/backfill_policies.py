"""The orders a partial backfill can re-embed rows in (one list: the backfill config's choices
and the scorer that computes them)."""

BACKFILL_POLICIES = ("uncertainty", "random", "old-discriminativeness")
