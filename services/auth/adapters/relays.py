"""The auth service's outbox relays (shared/outbox.py): toward the referral service, the links of
signups with a code, the "verified" notices (a user's address is proven: their pending link becomes
confirmed) and the erasures of accounts (the referral service erases its part); toward the mail
server, the verification and reset mails.

A signup with a code writes its link to `auth.referral_outbox` in the signup's transaction, already
claimed by that signup, which then tries to deliver it once (`deliver_now`); whatever that attempt
does, the relay (shared/outbox.py) delivers what is left, with backoff. The referral service records
a link idempotently by referral id, so a delivery repeated after a lost answer does no harm; a 409 or
422 (the user became someone else's referral meanwhile) is a refusal for good.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from prometheus_client import CollectorRegistry

from services.auth.adapters.db.erasure import ErasureOutboxRepository
from services.auth.adapters.db.outboxes import (
    MailOutboxRepository,
    OutgoingMail,
    ReferralOutboxRepository,
    VerifiedOutboxRepository,
)
from services.auth.adapters.mail.messages import compose
from services.auth.adapters.mail.smtp import MailDeliveryError, SmtpMailer
from services.auth.adapters.referral_client import LinkRefused, ReferralClient
from services.auth.domain.errors import ReferralServiceError
from services.auth.domain.models import Erasure, ReferralLink
from shared.outbox import Backoff, Claimed, OutboxRelay, PermanentFailure, TemporaryFailure

ReferralOutboxRelay = OutboxRelay[ReferralLink]


class ImmediateReferralDelivery:
    """A signup's own attempt at the link it just committed, already claimed (attempt 1): the relay
    delivers it once the claim's lease ends if this attempt fails."""

    def __init__(self, relay: ReferralOutboxRelay) -> None:
        self._relay = relay

    async def deliver_now(self, link: ReferralLink) -> None:
        await self._relay.deliver_now(Claimed(link, link.referral_id, 1))


def referral_link_relay(
    outbox: ReferralOutboxRepository,
    client: ReferralClient,
    *,
    backoff: Backoff,
    poll_interval: float,
    call_timeout: float,
    registry: CollectorRegistry,
) -> ReferralOutboxRelay:
    """The relay of `auth.referral_outbox`; `/metrics` counts its attempts as auth_referral_deliveries."""

    async def deliver(link: ReferralLink) -> str:
        try:
            created = await client.record_referral(link)
        except LinkRefused as refused:
            raise PermanentFailure(str(refused)) from None
        except ReferralServiceError as error:
            raise TemporaryFailure(str(error)) from None
        return "delivered" if created else "already_recorded"

    return OutboxRelay(
        "referral link",
        outbox,
        deliver,
        backoff=backoff,
        poll_interval=poll_interval,
        call_timeout=call_timeout,
        registry=registry,
        metric="auth_referral_deliveries",
        describe=lambda link: {"referral_id": str(link.referral_id), "referrer_id": str(link.referrer_id)},
    )


def verified_notice_relay(
    outbox: VerifiedOutboxRepository,
    client: ReferralClient,
    *,
    backoff: Backoff,
    poll_interval: float,
    call_timeout: float,
    registry: CollectorRegistry,
) -> OutboxRelay[uuid.UUID]:
    """The relay of `auth.verified_outbox`; `/metrics` counts its attempts as auth_verified_notices."""

    async def deliver(user_id: uuid.UUID) -> str:
        try:
            await client.confirm_user(user_id)
        except ReferralServiceError as error:
            raise TemporaryFailure(str(error)) from None
        return "delivered"

    return OutboxRelay(
        "verified notice",
        outbox,
        deliver,
        backoff=backoff,
        poll_interval=poll_interval,
        call_timeout=call_timeout,
        registry=registry,
        metric="auth_verified_notices",
        describe=lambda user_id: {"user_id": str(user_id)},
    )


ErasureRelay = OutboxRelay[Erasure]


class ImmediateErasureDelivery:
    """The erasure's own attempt at the row it just committed, already claimed (attempt 1)."""

    def __init__(self, relay: ErasureRelay) -> None:
        self._relay = relay

    async def deliver_now(self, erasure: Erasure) -> None:
        await self._relay.deliver_now(Claimed(erasure, erasure.id, 1))


def erasure_relay(
    outbox: ErasureOutboxRepository,
    client: ReferralClient,
    *,
    backoff: Backoff,
    poll_interval: float,
    call_timeout: float,
    registry: CollectorRegistry,
) -> ErasureRelay:
    """The relay of `auth.erasure_outbox`, retried until the referral service has erased its part (it is
    idempotent); `/metrics` counts its attempts as auth_erasure_deliveries."""

    async def deliver(erasure: Erasure) -> str:
        try:
            await client.erase_user(erasure.user_id, erasure.replacement_id)
        except ReferralServiceError as error:
            raise TemporaryFailure(str(error)) from None
        return "delivered"

    return OutboxRelay(
        "erasure",
        outbox,
        deliver,
        backoff=backoff,
        poll_interval=poll_interval,
        call_timeout=call_timeout,
        registry=registry,
        metric="auth_erasure_deliveries",
        describe=lambda erasure: {"erasure_id": str(erasure.id)},
    )


# A mail not sent after this long is given up (an error line and the metric say so): its link is stale.
MAIL_GIVE_UP_AFTER = timedelta(hours=24)


def mail_relay(
    outbox: MailOutboxRepository,
    mailer: SmtpMailer,
    *,
    sender: str,
    valid_for: dict[str, str],
    backoff: Backoff,
    poll_interval: float,
    call_timeout: float,
    registry: CollectorRegistry,
) -> OutboxRelay[OutgoingMail]:
    """The relay of `auth.mail_outbox` over SMTP: a 5xx answer is final, anything else is retried for up
    to a day; `/metrics` counts its attempts as auth_mails. `valid_for` says how long each kind's link
    lives, in words, for the mail's text."""

    async def deliver(mail: OutgoingMail) -> str:
        message = compose(
            mail.kind, sender=sender, recipient=mail.recipient, link=mail.link, valid_for=valid_for[mail.kind]
        )
        try:
            await mailer.send(message)
        except MailDeliveryError as error:
            raise (PermanentFailure if error.permanent else TemporaryFailure)(error.reason) from None
        return "sent"

    return OutboxRelay(
        "mail",
        outbox,
        deliver,
        backoff=backoff,
        poll_interval=poll_interval,
        call_timeout=call_timeout,
        registry=registry,
        metric="auth_mails",
        # The recipient is personal data and the link a live token: only the ids are logged.
        describe=lambda mail: {"mail_id": str(mail.id), "user_id": str(mail.user_id), "kind": mail.kind},
        give_up_after=MAIL_GIVE_UP_AFTER,
    )
