"""Benchmarks for inferq: one command, ``python -m bench run``, prints ratios.

Everything runs on this machine in one run (the in-process limit, a hand-written Celery
baseline, inferq bulk and online, memory), so the ratios compare like with like even on
a shared, noisy machine. Absolute figures are printed but never asserted on.
"""
