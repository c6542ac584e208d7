"""Replay and rollout storage, and pure return functions."""
