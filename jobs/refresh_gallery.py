"""Ray job: refresh a gallery with the upgrade module.

ray job submit --working-dir . -- python jobs/refresh_gallery.py --config configs/refresh_local.yaml
"""

import sys

from dmu_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["refresh", *sys.argv[1:]]))
