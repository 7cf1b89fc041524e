"""`python -m services.auth serve|migrate|rollback`: the service's only entry point."""

from __future__ import annotations

import sys
from pathlib import Path

from services.auth.adapters.db.tables import SCHEMA
from services.auth.app import create_app
from services.auth.settings import load_auth_settings
from shared.cli import run_service_command

MIGRATIONS = Path(__file__).parent / "migrations"

if __name__ == "__main__":
    sys.exit(
        run_service_command(
            "auth",
            load=load_auth_settings,
            create_app=create_app,
            schema=SCHEMA,
            migrations=MIGRATIONS,
        )
    )
