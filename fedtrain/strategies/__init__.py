"""Aggregation strategies by name, built on Flower's own implementations."""

from fedtrain.strategies.registry import STRATEGIES, STREAMABLE, make_strategy

__all__ = ["STRATEGIES", "STREAMABLE", "make_strategy"]
