"""Generated referral codes: random, short enough to type, with no look-alike characters."""

from __future__ import annotations

import secrets

# No 0/O, 1/I/L, U/V confusion: 8 digits and 21 letters, read back case-insensitively.
ALPHABET = "23456789ABCDEFGHJKMNPQRSTWXYZ"
LENGTH = 11  # about 53 bits from the OS's CSPRNG


def generate_code() -> str:
    """A new code such as `K7QM2XRT4HZ`."""
    return "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))
