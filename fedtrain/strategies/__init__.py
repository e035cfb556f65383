"""Aggregation strategies by name, built on Flower's own implementations."""

from fedtrain.strategies.registry import STRATEGIES, make_strategy

__all__ = ["STRATEGIES", "make_strategy"]
