"""``independent``: the new model trained on its own, L = CE_margin(W_n, f_n). The upper bound
for new-to-new retrieval, with no compatibility at all."""

from __future__ import annotations

from typing import Any, Literal

from dmu_ray.methods.base import Method, register_method


@register_method
class Independent(Method):
    """No old model: the reference point for what compatibility costs."""

    name: Literal["independent"] = "independent"
    needs_old_model = False
    old_features = False
    same_dim_as_old = False

    def build(self, cfg: Any, info: dict[str, Any]):
        from dmu_ray.methods.trainee import Trainee

        model, head = self.fresh_model(cfg, info)
        return Trainee(model, head, self), None

    def loss(self, t, x, labels, f_o):
        _, ce, stats = self.classify_new(t, x, labels)
        return ce, stats
