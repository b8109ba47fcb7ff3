"""One module per registered upgrade method (see :mod:`dmu_ray.methods.base`). Every module in
this folder is imported here, so adding a method is adding a file."""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
