"""Benchmarks: storage efficiency and speed of immagent, side by side with LangGraph."""
