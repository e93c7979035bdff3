"""The example jobs run on a real stack (Redis, worker, server) from ``worker.testing``."""

import pytest

from worker.testing import progress_stack  # noqa: F401  (the fixture)


@pytest.fixture(scope="session")
def jobs_module() -> str:
    return "examples.convert,examples.primes"
