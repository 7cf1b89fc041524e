"""The referral service's data layer: Core tables and repositories (SQL only)."""
