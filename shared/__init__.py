"""Code both services use: settings, database, Redis, errors, OpenAPI, health, logging, tokens."""
