"""Held-out evaluation of policies: best-of-N with every selector, comparisons of runs.
"""
