"""Ray job: embed an image set with a model into a new gallery prefix.

ray job submit --working-dir . -- python jobs/embed.py --config configs/embed_local.yaml
"""

import sys

from dmu_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
