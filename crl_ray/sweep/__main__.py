"""``python -m crl_ray.sweep``: see crl_ray.sweep.cli."""

import sys

from crl_ray.sweep.cli import main

sys.exit(main())
