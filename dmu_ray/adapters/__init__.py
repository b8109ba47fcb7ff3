"""Adapters between two frozen models, fitted on paired vectors: an old -> new map that refresh
and backfill apply to the gallery, or a new -> old map for queries; the label-free gate that says
what share of a full re-embedding's neighbours each strategy retrieves."""
