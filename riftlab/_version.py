"""riftlab's version (one place; the package, its checkpoints and its build read it)."""

__version__ = "0.1.0"
