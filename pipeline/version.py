"""The package version, in a module of its own so that stage modules can import it without
importing the package's API (and the API the stages)."""
__version__ = "0.1.0"
