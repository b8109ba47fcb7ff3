"""dmu-ray: Darwinian Model Upgrades for retrieval embeddings on Ray."""

__version__ = "0.1.0"
