"""shared/emails.py: the spellings of one mailbox, and disposable domains."""

from __future__ import annotations

import pytest

from shared.emails import is_disposable, mailbox, same_mailbox


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("Jane.Doe@Gmail.com", "janedoe@gmail.com"),
        ("j.a.n.e.doe@googlemail.com", "janedoe@gmail.com"),
        ("janedoe+news@gmail.com", "jane.doe@GOOGLEMAIL.COM"),
        ("ann+a+b@example.com", "ANN@example.com"),
        (" ann@example.com ", "ann@example.com."),
    ],
)
def test_spellings_of_one_mailbox(first: str, second: str) -> None:
    assert same_mailbox(first, second)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("jane.doe@example.com", "janedoe@example.com"),  # dots count outside Gmail
        ("ann@example.com", "ann@example.org"),
        ("ann@gmail.com", "ann@gmail.co"),
        ("ann@mail.example.com", "ann@example.com"),
    ],
)
def test_other_mailboxes(first: str, second: str) -> None:
    assert not same_mailbox(first, second)


def test_the_canonical_spelling() -> None:
    assert mailbox("J.Doe+x@GoogleMail.com") == "jdoe@gmail.com"
    assert mailbox("Ann+x@Example.com") == "ann@example.com"


@pytest.mark.parametrize(
    ("email", "disposable"),
    [
        ("a@mailinator.com", True),
        ("a@MAILINATOR.COM", True),
        ("a@eu.mailinator.com", True),  # a subdomain of a listed domain
        ("a@example.com", False),
        ("a@gmail.com", False),
        ("a@mailinator.com.example.org", False),  # a listed name inside another domain
        ("a@com", False),
        ("no-at-sign", False),
    ],
)
def test_disposable_domains(email: str, disposable: bool) -> None:
    assert is_disposable(email) is disposable
