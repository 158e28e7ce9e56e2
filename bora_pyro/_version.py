"""The library version, in a module of its own so that any module can read it without importing
the package's public API (`bora_pyro/__init__.py` imports most modules)."""

__version__ = "0.1.0"
