"""Gallery refresh on Ray Data: old vectors through the upgrade module into a new gallery prefix."""

from dmu_ray.refresh.job import RefreshResult, plan_refresh, run_refresh

__all__ = ["RefreshResult", "plan_refresh", "run_refresh"]
