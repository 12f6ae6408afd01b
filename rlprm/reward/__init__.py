"""The reward: reward models (training, scoring, their metrics), adapters for public PRMs, how scores become
per-token rewards, labelling and PRM benchmarks.
"""
