"""The upgrade plan: ``bench`` measures on the user's cluster what each path's work runs at
(:mod:`dmu_ray.plan.bench`), ``plan`` prices every path and sets it against the quality the
evaluations measured (:mod:`dmu_ray.plan.job`, arithmetic in :mod:`dmu_ray.plan.costs`). It sits
above the jobs whose code it times and whose reports it reads."""
