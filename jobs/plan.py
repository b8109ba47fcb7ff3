"""Ray job: the upgrade plan from a bench JSON and the quality evidence (no cluster work; a job
so that it runs where the bench's and the evaluations' outputs are).

ray job submit --working-dir . -- python jobs/plan.py --config configs/plan_local.yaml
"""

import sys

from dmu_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["plan", *sys.argv[1:]]))
