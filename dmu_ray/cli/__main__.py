"""``python -m dmu_ray.cli``: the ``dmu-ray`` command."""

import sys

from dmu_ray.cli import main

sys.exit(main())
