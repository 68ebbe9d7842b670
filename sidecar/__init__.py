"""hms-sidecar: the service sidecar daemon."""

__version__ = "0.1.0"
