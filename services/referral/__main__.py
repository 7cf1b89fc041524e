"""`python -m services.referral serve|migrate|rollback`: the service's only entry point."""

from __future__ import annotations

import sys
from pathlib import Path

from services.referral.app import create_app
from services.referral.db.tables import SCHEMA
from services.referral.settings import PREFIX, ReferralSettings
from shared.cli import run_service_command

MIGRATIONS = Path(__file__).parent / "migrations"

if __name__ == "__main__":
    sys.exit(
        run_service_command(
            "referral",
            settings_class=ReferralSettings,
            prefix=PREFIX,
            create_app=create_app,
            schema=SCHEMA,
            migrations=MIGRATIONS,
        )
    )
