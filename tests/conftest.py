"""Fixtures shared by the tests: the database (each persistence test runs on SQLite and on
PostgreSQL), settings and an in-process app on a temporary data dir, keys, the real Omniglot and its
cache, and the one local Ray cluster of the tests marked ``ray``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import ADMIN_TOKEN, BACKENDS, TESTS, fresh_database, make_app, make_settings, use_database

from service.config import Settings

# Ray workers import the test-only modules from tests/ (user_models.py, the test files' own worker
# and driver classes): set for the whole session, so that whichever test starts Ray first (the
# fixture below, or a test whose service starts it from a run's thread) gives its workers this path.
os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--db", action="append", choices=BACKENDS, default=None,
                     help="a database the persistence tests run on (repeat for both; default: sqlite and "
                          "postgresql, the latter at MAML_TEST_POSTGRES_URL, else postgres@127.0.0.1:5432)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A test that uses the database runs once per backend. Module scope: a module's tests are grouped
    # by backend, and a module-scoped fixture (one trained app) can take its own database too.
    if "db_backend" in metafunc.fixturenames:
        backends = metafunc.config.getoption("db") or list(BACKENDS)
        only = metafunc.definition.get_closest_marker("backends")  # a test of one backend's behaviour
        if only is not None:
            backends = [backend for backend in backends if backend in only.args]
        metafunc.parametrize("db_backend", backends, indirect=True, scope="module")


@pytest.fixture(scope="module")
def db_backend(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgresql``: the backend of this variant of the test."""
    return request.param


@pytest.fixture
def database(db_backend: str) -> Iterator[str | None]:
    """The test's own database, which ``make_settings`` uses while the test runs: SQLite under the
    data dir (None), or a fresh PostgreSQL database (its URL), dropped after the test."""
    with fresh_database(db_backend) as url, use_database(url):
        yield url


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray cluster of 2 CPUs for every test that needs one; shut down at the end."""
    ray = pytest.importorskip("ray")
    from workers.raygroup import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The real Omniglot (marker ``data``): ``MAML_DATA_ROOT``, as ``make test`` and ``.ci/run`` set it.

    Fails rather than skips without it, so a run that was meant to read the real data cannot pass
    without having read it (deselect with ``-m "not data"``).
    """
    value = os.environ.get("MAML_DATA_ROOT")
    if not value:
        pytest.fail("MAML_DATA_ROOT is not set: the tests marked `data` read the real Omniglot from it "
                    "(`make test` sets it to ../shared/data; or deselect them with -m 'not data')", pytrace=False)
    root = Path(value).expanduser()
    for folder in (root, root / "omniglot"):
        if all((folder / name).is_file() for name in ("images_background.zip", "images_evaluation.zip")):
            return folder
    pytest.fail(f"MAML_DATA_ROOT={value}: no images_background.zip and images_evaluation.zip in it or in its "
                "omniglot/ folder", pytrace=False)


@pytest.fixture
def float64_default() -> Iterator[None]:
    """float64 for a test's tensors and modules, restored after it (no leak into others); a module of
    float64 reference tests takes it with ``pytestmark = pytest.mark.usefixtures("float64_default")``."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session")
def dataset_cache() -> Path:
    """A cache of decoded data shared by test sessions: ``MAML_CACHE_DIR``, else ``~/.cache/maml-service``."""
    return Path(os.environ.get("MAML_CACHE_DIR") or "~/.cache/maml-service").expanduser()


@pytest.fixture
def settings(tmp_path: Path, database: str | None) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(make_app(settings)) as c:
        yield c


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def tenant_key(client: TestClient, admin_headers: dict[str, str]) -> Callable[[str], dict[str, str]]:
    """``tenant_key("acme")``: headers with a new key of that tenant."""

    def make(tenant: str) -> dict[str, str]:
        r = client.post("/api/v1/keys", json={"tenant": tenant, "name": "test"}, headers=admin_headers)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['secret']}"}

    return make


