"""Ray job: FastFill partial backfill of a gallery (or, with --curve, its backfill curve).

ray job submit --working-dir . -- python jobs/backfill.py --config configs/backfill_local.yaml
"""

import sys

from dmu_ray.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    command = "backfill-curve" if "--curve" in args else "backfill"
    sys.exit(main([command, *(a for a in args if a != "--curve")]))
