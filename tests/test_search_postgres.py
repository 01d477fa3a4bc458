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
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_search import SPACE, assert_each_policy_measured_once, completed, search_process


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
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 with a database `policyc`, stopped and removed afterwards. As root,
    it runs as the `postgres` user (the server refuses to run as root)."""
    bin_dir, port = _postgres_bin(), _free_port()
    root = Path(tempfile.mkdtemp(prefix="policyc-pg-"))
    as_user: list[str] = []
    if getpass.getuser() == "root":
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, cwd=root, timeout=120)

    data = root / "data"
    run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
    try:
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "policyc")
        yield f"postgresql://postgres@127.0.0.1:{port}/policyc"
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_a_study(postgres_url: str, tmp_path: Path) -> None:
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
