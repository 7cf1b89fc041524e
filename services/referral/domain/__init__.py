"""The referral service's business: models, rules, use cases, errors and the ports they need; no I/O."""
