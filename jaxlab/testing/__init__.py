"""Helpers for tests and examples: tiny fixtures written in real file formats."""
