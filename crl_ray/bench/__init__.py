"""Benchmarks that print numbers (JSON): ``python -m crl_ray.bench {step,attack,overhead} [options]``.

Speed and memory targets live here, never in timed tests.
"""
