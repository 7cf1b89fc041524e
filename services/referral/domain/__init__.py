"""The referral service's use cases and rules; no HTTP, no SQL."""
