"""Integrations with other agent frameworks; each module imports its framework, the package none."""
