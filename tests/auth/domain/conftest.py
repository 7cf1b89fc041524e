"""The auth use cases on in-memory fakes of their ports: no database, Redis or network."""

from __future__ import annotations

import pytest

from tests.auth.domain.fakes import World


@pytest.fixture
def world() -> World:
    return World()
