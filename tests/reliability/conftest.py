"""Reliability suite: the CI part runs by default; ``@pytest.mark.heavy`` trials run only
with ``--heavy-trials N`` (N > 0), e.g. ``pytest tests/reliability -m heavy --heavy-trials 20``."""
from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--heavy-trials", type=int, default=0, metavar="N",
                     help="run the heavy reliability trials (marker 'heavy') N times each; 0 skips them")
    parser.addoption("--heavy-seed", type=int, default=20261124, metavar="SEED",
                     help="seed of the random kill moments of the heavy trials")


# Wall-clock allowance per heavy trial (a 2-rank launch, a kill and a relaunch take about
# 60 s on 2 cores): the suite-wide --timeout would cut a 20-trial run short.
SECONDS_PER_HEAVY_TRIAL = 180


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    trials = config.getoption("--heavy-trials", default=0)
    if trials > 0:
        for item in items:
            if "heavy" in item.keywords:
                item.add_marker(pytest.mark.timeout(300 + trials * SECONDS_PER_HEAVY_TRIAL))
        return
    skip = pytest.mark.skip(reason="heavy reliability trial: run with --heavy-trials N")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def heavy_trials(pytestconfig: pytest.Config) -> int:
    return int(pytestconfig.getoption("--heavy-trials", default=0))


@pytest.fixture(scope="session")
def heavy_seed(pytestconfig: pytest.Config) -> int:
    return int(pytestconfig.getoption("--heavy-seed", default=20261124))


@pytest.fixture(scope="session")
def slurm():
    """A running one-node SLURM cluster (tests/reliability/slurm_cluster.py), shared by the
    tests that submit jobs; yields the environment its clients need."""
    from tests.reliability.slurm_cluster import cluster

    with cluster() as env:
        yield env
