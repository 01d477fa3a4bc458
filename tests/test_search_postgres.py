"""Two workers share one search study through a real PostgreSQL server (Debian's package, started here in a
temporary directory): every trial finishes once, no policy is measured twice, and the trial count holds."""

from __future__ import annotations

import getpass
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_search import SPACE, assert_each_policy_measured_once, completed, search_process

from policyc.policy_search import open_study


def _postgres_bin() -> Path:
    found = shutil.which("pg_ctl") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))), None)
    if found is None:
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (.ci/run installs it)")
    return Path(found).resolve().parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def new_database() -> Iterator[Callable[[str], str]]:
    """A PostgreSQL server on 127.0.0.1, stopped and removed afterwards; the fixture creates a database by
    name and gives its URL. As root, the server runs as the `postgres` user (it refuses to run as root)."""
    bin_dir, port = _postgres_bin(), _free_port()
    root = Path(tempfile.mkdtemp(prefix="policyc-pg-"))
    as_user: list[str] = []
    if getpass.getuser() == "root":
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, cwd=root, timeout=120)

    def create(name: str) -> str:
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name)
        return f"postgresql://postgres@127.0.0.1:{port}/{name}"

    data = root / "data"
    run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
    try:
        yield create
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_workers_starting_together_on_an_empty_database(new_database: Callable[[str], str]) -> None:
    """Eight workers open one study at the same instant on a database without tables: they race to create
    the schema (a unique violation on pg_type for the losers) and all must still open the one study."""
    url = new_database("race")
    start = threading.Barrier(8)
    opened: list[str] = []
    failures: list[BaseException] = []

    def worker() -> None:
        start.wait()
        try:
            opened.append(open_study(url, "together", {"accuracy": "maximize"})._study_id)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert failures == []
    assert len(opened) == 8 and len(set(opened)) == 1


def test_two_workers_share_a_study(new_database: Callable[[str], str], tmp_path: Path) -> None:
    postgres_url = new_database("policyc")
    space = tmp_path / "space.tokpol"
    space.write_text(SPACE)
    workers = [search_process(space, tmp_path / f"out{i}", postgres_url, trials=10, seed=i) for i in (1, 2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
    trials = completed(postgres_url, "s")
    assert 10 <= len(trials) <= 11  # a worker may finish the trial it started as the other reached 10
    assert_each_policy_measured_once(trials)
    assert all("Pareto front" in out for out, _ in outputs)
    assert os.path.exists(tmp_path / "out1" / "pareto.png")
