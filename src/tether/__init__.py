"""Tether: a self-hosted training server for reinforcement-learning agents that live elsewhere."""

__version__ = "0.1.0"
