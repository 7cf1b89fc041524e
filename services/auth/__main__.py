"""`python -m services.auth serve|migrate|rollback`: the service's only entry point."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from aiohttp import web

from services.auth.app import create_app
from services.auth.db.tables import SCHEMA
from services.auth.settings import PREFIX, AuthSettings
from shared.config import SettingsError, load_settings
from shared.logs import JsonAccessLogger, configure_logging
from shared.migrations import apply_migrations, rollback_migrations

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger("services.auth")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.auth")
    parser.add_argument("command", choices=["serve", "migrate", "rollback"])
    args = parser.parse_args(argv)
    try:
        settings = load_settings(AuthSettings, PREFIX, os.environ)
    except SettingsError as error:
        print(f"auth: configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging("auth", settings.log_level)
    if args.command == "migrate":
        applied = apply_migrations(settings.database_url, SCHEMA, MIGRATIONS)
        log.info("migrations applied", extra={"applied": applied, "schema": SCHEMA})
        return 0
    if args.command == "rollback":
        rolled_back = rollback_migrations(settings.database_url, SCHEMA, MIGRATIONS)
        log.info("migrations rolled back", extra={"rolled_back": rolled_back, "schema": SCHEMA})
        return 0
    try:
        app = create_app(settings)
    except SettingsError as error:
        print(f"auth: configuration error: {error}", file=sys.stderr)
        return 2
    log.info("listening", extra={"host": settings.host, "port": settings.port})
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        access_log_class=JsonAccessLogger,
        print=None,
        shutdown_timeout=15,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
