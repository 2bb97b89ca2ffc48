"""Platform ports: the only modules that import platform-specific libraries."""
