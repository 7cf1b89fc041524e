"""`python -m services.referral serve|migrate|rollback`: the service's only entry point."""

from __future__ import annotations

import sys
from pathlib import Path

from services.referral.adapters.tables import SCHEMA
from services.referral.app import create_app
from services.referral.settings import PREFIX, ReferralSettings
from shared.cli import run_service_command
from shared.config import load_settings

MIGRATIONS = Path(__file__).parent / "migrations"

if __name__ == "__main__":
    sys.exit(
        run_service_command(
            "referral",
            load=lambda environ: load_settings(ReferralSettings, PREFIX, environ),
            create_app=create_app,
            schema=SCHEMA,
            migrations=MIGRATIONS,
        )
    )
