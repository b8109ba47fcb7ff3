"""Ray job: the whole upgrade lifecycle (train old, train new, refresh, evaluate).

ray job submit --working-dir . -- python jobs/lifecycle.py --storage s3://bucket/dmu-demo
"""

import sys

from dmu_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
