"""Hyperparameter search with Ray Tune over the real trainers (issue 15): space, trial callbacks, search."""
