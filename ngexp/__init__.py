"""ngexp: an experiment runner for second-order optimization and pruning of neural networks."""

__version__ = "0.1.0"
