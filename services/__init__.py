"""The services of the referral system."""
