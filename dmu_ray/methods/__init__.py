"""Upgrade methods as loss modules: independent, bct, dmu (fastfill, unibct to come)."""
