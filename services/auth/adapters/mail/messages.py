"""The mails the auth service sends: an email-verification link and a password-reset link."""

from __future__ import annotations

import html
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from functools import cache
from importlib.resources import files
from string import Template

from services.auth.domain.models import RESET_PASSWORD, VERIFY_EMAIL

MAX_LINE_LENGTH = 998
SUBJECTS = {
    VERIFY_EMAIL: "Confirm your email address",
    RESET_PASSWORD: "Reset your password",
}


def compose(kind: str, *, sender: str, recipient: str, link: str, valid_for: str) -> EmailMessage:
    """A mail of `kind` holding `link`: multipart/alternative, plain text then HTML; ValueError if unknown."""
    if kind not in SUBJECTS:
        raise ValueError(f"unknown mail kind {kind!r}; expected one of {sorted(SUBJECTS)}")
    if not link.startswith(("https://", "http://")) or any(c.isspace() or not c.isprintable() for c in link):
        # The link goes into an href: anything but a plain web address is a bug upstream.
        raise ValueError("the link must be an http(s) URL without spaces or control characters")
    message = EmailMessage()
    message["Subject"] = SUBJECTS[kind]
    message["From"] = sender
    message["To"] = recipient
    message["Date"] = formatdate(usegmt=True)
    # The sender's domain, not make_msgid's default: that one asks DNS for this host's name.
    message["Message-ID"] = make_msgid(domain=parseaddr(sender)[1].rpartition("@")[2] or "localhost")
    # RFC 3834: vacation responders and the like do not answer machine-sent mail.
    message["Auto-Submitted"] = "auto-generated"
    text = _template(f"{kind}.txt").substitute(link=link, valid_for=valid_for)
    page = _template(f"{kind}.html").substitute(link=html.escape(link), valid_for=html.escape(valid_for))
    message.set_content(text, cte=_transfer_encoding(text))
    message.add_alternative(page, subtype="html", cte=_transfer_encoding(page))
    return message


def _transfer_encoding(body: str) -> str | None:
    # The library's own choice for a line over 78 characters (any real link) is quoted-printable, which
    # breaks the link over lines and turns each '=' into '=3D' for anyone reading the raw mail (the .eml
    # files of `make run`); plain 7-bit is valid up to 998 characters a line (RFC 5322).
    fits = body.isascii() and all(len(line) <= MAX_LINE_LENGTH for line in body.splitlines())
    return "7bit" if fits else None


@cache
def _template(name: str) -> Template:
    return Template(files(__package__).joinpath("templates", name).read_text(encoding="utf-8"))
