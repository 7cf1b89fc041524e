"""Read the mails `make run`'s embedded SMTP server kept (`.data/mail/*.eml`) without a mail client.

`python3 -m deploy.local.mail a@example.com` prints the newest mail to that address (its subject and
plain text); `--link verify-email` prints only the link to that page in it, `--token verify-email`
only the link's token. A mail leaves a moment after the request that caused it, so it waits up to
`--wait` seconds (15) for one. Standard library only, so the system's python3 runs it.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

MAIL_DIR = Path(__file__).resolve().parents[2] / ".data" / "mail"
PAGES = ("verify-email", "reset-password")


def newest_to(recipient: str, mail_dir: Path = MAIL_DIR, page: str | None = None) -> EmailMessage | None:
    """The newest mail to `recipient` (linking to `page`, when given); None when there is none."""
    for path in sorted(mail_dir.glob("*.eml"), reverse=True):  # the names sort by arrival
        message = BytesParser(_class=EmailMessage, policy=policy.default).parsebytes(path.read_bytes())
        if str(message["To"]).strip().lower() != recipient.strip().lower():
            continue
        if page is None or link_in(message, page) is not None:
            return message
    return None


def text_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    return str(part.get_content()) if part is not None else ""


def link_in(message: EmailMessage, page: str) -> str | None:
    """The link to `page` (…/verify-email#token=…) in the mail's text."""
    found = re.search(rf"(\S+/{re.escape(page)}#token=[A-Za-z0-9_-]+)", text_of(message))
    return found.group(1) if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m deploy.local.mail", description=__doc__.splitlines()[0])
    parser.add_argument("recipient")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--link", choices=PAGES, help="print only the link to this page")
    which.add_argument("--token", choices=PAGES, help="print only that link's token")
    parser.add_argument(
        "--dir", type=Path, default=MAIL_DIR, help=f"where the mails are (default {MAIL_DIR})"
    )
    parser.add_argument("--wait", type=float, default=15.0, help="seconds to wait for a mail (default 15)")
    args = parser.parse_args(argv)
    page = args.link or args.token
    deadline = time.monotonic() + args.wait
    while (message := newest_to(args.recipient, args.dir, page)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if message is None:
        what = f"with a {page} link " if page else ""
        print(f"no mail {what}to {args.recipient} in {args.dir}", file=sys.stderr)
        return 1
    if page is None:
        print(f"Subject: {message['Subject']}\n\n{text_of(message)}")
        return 0
    link = link_in(message, page)
    assert link is not None
    print(link.rsplit("#token=", 1)[1] if args.token else link)
    return 0


if __name__ == "__main__":
    sys.exit(main())
