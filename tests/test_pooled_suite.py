"""The store-level suites (tests/test_store.py, tests/test_verify.py) again, on the
replication cluster: through PgBouncer in transaction pooling mode, and through a Store
reading from the hot standby. Only the store under test changes; the tests inspect and
damage rows on the primary directly, as they do elsewhere."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator

import pytest

from immagent import Store
from tests.cluster_store import empty_store
from tests.pg_cluster import PgCluster
from tests.test_store import *  # noqa: F403  (re-collected here with the fixtures below)
from tests.test_verify import *  # noqa: F403

# Only the tests that use the parametrised store: the others would just run again.
for _name, _test in list(globals().items()):
    if _name.startswith("test_") and not {"store", "store_dsn"} & set(
            inspect.signature(_test).parameters):
        del globals()[_name]

VIA = ["pgbouncer", "replica"]


@pytest.fixture(params=VIA)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_dsn(pg_cluster_db: PgCluster) -> str:
    """The primary, emptied: where the tests look at and damage rows."""
    return empty_store(pg_cluster_db).primary


@pytest.fixture
async def store(store_dsn: str, backend_name: str,
                pg_cluster_db: PgCluster) -> AsyncIterator[Store]:
    if backend_name == "pgbouncer":
        s = await Store.connect(f"{pg_cluster_db.bouncer} prepare_threshold=none",
                                min_size=1, max_size=4)
    else:
        s = await Store.connect(store_dsn, replicas=[pg_cluster_db.standby], min_size=1,
                                max_size=4)
    await s.init_schema()
    try:
        yield s
    finally:
        await s.close()
