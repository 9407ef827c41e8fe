"""ember: Lambda-compatible serverless functions on your own machines."""

__version__ = "0.1.0"
