"""Shared pytest options and fixtures."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n N`), each worker takes its share of the cores for torch's threads and compiles
    inductor code in-process, so N workers do not each start a thread per core and slow each other down."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch
        import torch._inductor.config

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
        torch._inductor.config.compile_threads = 1


def pytest_addoption(parser: pytest.Parser) -> None:
    """`--update-goldens` rewrites golden files instead of comparing against them."""
    parser.addoption(
        "--update-goldens",
        action="store_true",
        default=False,
        help="rewrite tests/golden/** expected outputs from the current implementation",
    )


@pytest.fixture
def update_goldens(request: pytest.FixtureRequest) -> bool:
    """Whether the run was asked to rewrite golden files."""
    return bool(request.config.getoption("--update-goldens"))
