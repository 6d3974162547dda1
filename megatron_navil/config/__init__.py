"""Typed dataclass configs and the name registry ("tiny", "navil-2b", "navil-9b").

Imports nothing else from the project.
"""
