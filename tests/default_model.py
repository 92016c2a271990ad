"""Fixtures for this area of the suite (filled in by its owner)."""
