"""Stage 5, evaluation: attacks (``attacks``), judges and their calibration (``judges``, ``probe``), capability and
benign-behaviour measures (``capability``), the objective and constraints (``objective``), one model's whole
evaluation (``run``) and its command line (``cli``; ``python -m crl_ray.evaluate``)."""
