"""``python -m crl_ray.evaluate``: see crl_ray.evaluate.cli."""

import sys

from crl_ray.evaluate.cli import main

sys.exit(main())
