"""Ray job: train a model with Ray Train.

ray job submit --working-dir . -- python jobs/train.py --config configs/train_dmu_local.yaml
"""

import sys

from dmu_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
