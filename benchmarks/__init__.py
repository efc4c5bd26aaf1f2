"""msggc benchmarks: every contender on an identical fresh copy of a seeded dataset.

Run with ``python -m benchmarks`` (see ``benchmarks/run.py`` for the options). The parent process
seeds one template database per shape, then runs each contender in a child process on a
``CREATE DATABASE ... TEMPLATE`` copy (``--seed-per-contender``: on a seed of its own) while another
child process plays a steady application load beside it, and writes JSON, a markdown table and a
plot.
"""
