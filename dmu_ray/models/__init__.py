"""Models: backbones, embedding heads, margin heads, the feature-upgrade module, artefacts."""
