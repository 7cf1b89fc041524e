"""The benchmark's topology starts, answers and stops cleanly (one instance of each service)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deploy.local.processes import alive, http_status
from services.auth.adapters.signing import generate_pem
from tests.harness import migrate
from tests.helpers import drop_redis_keys, fresh_database
from tests.perf import topology

pytestmark = pytest.mark.timeout(120)


def test_one_instance_topology_starts_answers_and_stops(
    server_database_url: str, redis_url: str, tmp_path: Path
) -> None:
    prefix = f"bench-test:{os.getpid()}:"
    with fresh_database(server_database_url, f"bench_test_{os.getpid()}") as database_url:
        migrate(database_url, redis_url, tmp_path)
        system = topology.build(
            instances=1,
            database_url=database_url,
            redis_url=redis_url,
            redis_prefix=prefix,
            signing_pem=generate_pem(),
            log_dir=tmp_path,
        )
        try:
            system.start()
            assert http_status(system.gateway_url + "/healthz") == 200
            for process in system.services:
                assert http_status(process.url + "/readyz") == 200, process.log_tail()
            pids = system.pids()
            assert [len(pids["auth"]), len(pids["referral"])] == [1, 1]
            assert len(pids["nginx"]) >= 2, pids  # the master and at least one worker
            for pid in [pid for group in pids.values() for pid in group]:
                assert alive(pid)
                rss = topology.rss_mb(pid)
                assert rss is not None and rss > 0
                assert topology.cpu_ticks(pid) is not None
            assert system.dead() == []
        finally:
            problems = system.stop()
            drop_redis_keys(redis_url, prefix)
        assert problems == []
        assert all(not alive(pid) for group in pids.values() for pid in group)
        for name in ("auth-0", "referral-0", "gateway"):
            assert (tmp_path / f"{name}.log").stat().st_size > 0
