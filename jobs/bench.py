"""Ray job: measure, on the cluster it runs on, the throughputs an upgrade plan needs.

ray job submit --working-dir . -- python jobs/bench.py --config configs/bench_local.yaml
"""

import sys

from dmu_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
