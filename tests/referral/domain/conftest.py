"""The referral use cases on in-memory fakes of their ports: no database, no Redis, no HTTP."""

from __future__ import annotations

import pytest

from tests.referral.domain.fakes import World, make_world


@pytest.fixture
def world() -> World:
    return make_world()
