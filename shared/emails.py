"""Email addresses as mailboxes: which spellings reach the same inbox, and throwaway domains.

Pure (no I/O): both services' domains use it (tests/test_layers.py lists it as such).
"""

from __future__ import annotations

from disposable_email_domains import blocklist

# Gmail ignores dots in the local part, and googlemail.com is the same service.
_GMAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})


def mailbox(email: str) -> str:
    """The canonical spelling of the inbox an address reaches: lowercase, without a `+tag` (for every
    domain), and for Gmail without the dots of the local part and with googlemail.com as gmail.com."""
    local, at, domain = email.strip().lower().rpartition("@")
    if not at:
        return email.strip().lower()
    domain = domain.rstrip(".")
    local = local.split("+", 1)[0]
    if domain in _GMAIL_DOMAINS:
        local, domain = local.replace(".", ""), "gmail.com"
    return f"{local}@{domain}"


def same_mailbox(first: str, second: str) -> bool:
    """Whether two addresses are spellings of one inbox (see `mailbox`)."""
    return mailbox(first) == mailbox(second)


def is_disposable(email: str) -> bool:
    """Whether the address's domain, or a domain above it, is on the maintained list of throwaway
    mail providers (the `disposable-email-domains` package)."""
    domain = email.strip().lower().rpartition("@")[2].rstrip(".")
    labels = domain.split(".")
    return any(".".join(labels[i:]) in blocklist for i in range(len(labels) - 1))
