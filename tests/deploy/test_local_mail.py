"""`python3 -m deploy.local.mail`: reading the mails `make run`'s embedded server kept."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from deploy.local import mail
from deploy.local.embedded import start_smtp
from services.auth.adapters.mail.messages import compose


def send(port: int, kind: str, recipient: str, link: str) -> None:
    message = compose(kind, sender="no-reply@example.com", recipient=recipient, link=link, valid_for="1 day")
    with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
        client.send_message(message)


def test_the_newest_mail_its_link_and_its_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with start_smtp(tmp_path) as server:
        port = int(server.url.split(":")[2].split("?")[0])
        send(port, "verify_email", "a@example.com", "http://127.0.0.1:8080/p/verify-email#token=old-token")
        send(port, "reset_password", "a@example.com", "http://127.0.0.1:8080/p/reset-password#token=reset-1")
        send(port, "verify_email", "a@example.com", "http://127.0.0.1:8080/p/verify-email#token=new-token")
        send(port, "verify_email", "b@example.com", "http://127.0.0.1:8080/p/verify-email#token=b-token")
    assert mail.main(["A@Example.com", "--token", "verify-email", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "new-token\n"
    assert mail.main(["a@example.com", "--link", "reset-password", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "http://127.0.0.1:8080/p/reset-password#token=reset-1\n"
    assert mail.main(["b@example.com", "--dir", str(tmp_path)]) == 0
    assert "Subject: Confirm your email address" in capsys.readouterr().out
    assert mail.main(["c@example.com", "--dir", str(tmp_path), "--wait", "0.2"]) == 1
    assert "no mail to c@example.com" in capsys.readouterr().err
