"""Ray job: evaluate every query/gallery model pairing.

ray job submit --working-dir . -- python jobs/evaluate.py --config configs/evaluate_local.yaml
"""

import sys

from dmu_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
