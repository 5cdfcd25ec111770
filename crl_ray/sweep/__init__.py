"""Stage 6, sweep: cluster capacity and storage checks (``cluster``), the Ray worker log filter (``raylogs``), Optuna
samplers, constraints and ASHA (``search``), MLflow runs (``tracking``), result plots (``plots``), one trial's
driver (``trial``), the sweep itself (``run``) and its command line (``cli``; ``python -m crl_ray.sweep``)."""
