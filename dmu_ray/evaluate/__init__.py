"""Retrieval evaluation: faiss search, metrics, the compatibility matrix, reports and plots."""
