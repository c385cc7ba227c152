"""The image installs the broker with `pip install .` (not editable): a built wheel must carry everything the
server reads at run time, the migrations first."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.support.pg import DatabaseFactory

ROOT = Path(__file__).resolve().parents[2]


async def test_migrate_runs_from_a_built_wheel(tmp_path: Path, databases: DatabaseFactory) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("token_broker-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    shipped = {Path(n).name for n in names if n.startswith("broker/postgres/migrations/")}
    in_tree = {p.name for p in (ROOT / "broker" / "postgres" / "migrations").iterdir() if p.suffix in (".sql", ".py")}
    assert shipped == in_tree

    db = await databases.create("empty")
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path / "site"),  # ahead of the editable install of the source tree
        "BROKER_DATABASE_URL": db.admin_url,
    }
    where = subprocess.run(
        [sys.executable, "-c", "import broker; print(broker.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert where.stdout.strip().startswith(str(tmp_path / "site")), where.stderr[-2000:]
    out = subprocess.run(
        [sys.executable, "-m", "broker", "migrate"], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    row = await db.fetchrow("SELECT count(*) AS n FROM pg_proc WHERE proname = 'get_oidc_link'")
    assert row is not None
    assert row["n"] >= 1
