"""Experiments built on the library: the tiny generator (prepare, SFT), active learning, synthetic supervision and
the demo that runs them all.
"""
