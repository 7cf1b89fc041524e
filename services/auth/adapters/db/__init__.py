"""The auth service's data layer: Core tables and repositories (SQL only)."""
