"""``python -m crl_ray.config reference``: print the sweep-file reference as Markdown (docs/CONFIG.md)."""

import sys

from crl_ray.config.reference import config_reference

if sys.argv[1:] != ["reference"]:
    print("usage: python -m crl_ray.config reference   (prints the sweep-file reference as Markdown)", file=sys.stderr)
    sys.exit(2)
print(config_reference(), end="")
