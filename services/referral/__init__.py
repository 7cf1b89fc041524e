"""The referral service: referral codes, their lookup, and who referred whom."""
