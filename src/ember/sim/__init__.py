"""Offline: the trace model and the replay that drives the same core as the server against a recorded workload."""
