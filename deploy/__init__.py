"""Deployment tooling: how the system is run locally and elsewhere."""
