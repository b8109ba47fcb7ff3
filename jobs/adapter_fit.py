"""Ray job: fit an adapter between two frozen models from two galleries sharing ids, and gate it.

ray job submit --working-dir . -- python jobs/adapter_fit.py --config configs/adapter_local.yaml
"""

import sys

from dmu_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["adapter", "fit", *sys.argv[1:]]))
