"""The package version, in a module of its own so that library modules can stamp their output with it without
importing the package ``__init__`` (which imports them: a cycle). pyproject.toml states the same version."""

__version__ = "0.1.0"
