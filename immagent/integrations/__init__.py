"""Clients of the store for other frameworks (each needs its optional extra)."""
