"""The package's version, in a module of its own so that the store writer (`flashlm.io`) can
stamp stores with it without importing the public API, which stands above it."""

__version__ = "0.1.0"
