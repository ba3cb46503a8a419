"""klbench: generative and Bayesian models compared through their KL ledgers."""

__version__ = "0.1.0"
