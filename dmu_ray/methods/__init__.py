"""Upgrade methods as losses and their helpers: independent, bct, dmu (losses), fastfill (losses,
backfill orders), unibct (prototype refinement)."""
