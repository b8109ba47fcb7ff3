# The image cluster/kuberay/*.yaml run (my-registry/dmu-ray:0.1.0): Ray's own GPU image of the
# pinned Ray (pyproject.toml) and Python, plus dmu-ray with the faiss GPU build, repo at /app.
# Build and push: docs/cluster.md. tests/test_cluster_configs.py checks the tag against the pins.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /app
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users dmu_ray ./dmu_ray
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users configs ./configs

# The package with its pinned torch/torchvision (CUDA builds on Linux); then the faiss GPU build
# replaces faiss-cpu (both wheels own the faiss/ package: remove one before installing the other).
RUN pip install --no-cache-dir -e . \
 && pip uninstall -y faiss-cpu \
 && pip install --no-cache-dir --force-reinstall --no-deps 'faiss-gpu-cu12>=1.11' \
 && python -c "import dmu_ray.cli, faiss, ray, torch; print('dmu-ray image:', ray.__version__, torch.__version__)"
