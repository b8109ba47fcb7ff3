"""Training images: Parquet of encoded images, importers of real data shipped in packages, splits."""
