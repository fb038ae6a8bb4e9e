"""What `pip install .` puts into site-packages: one import name, `tether`, and the command."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tether import __version__

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_one_import_name_and_the_tether_command(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # Nothing generic like `client` or `broker` lands beside everyone else's packages.
    assert {name.split("/")[0] for name in names} == {"tether", f"tether-{__version__}.dist-info"}
    # The links under tether/ were followed: the real modules are inside, under tether.
    for module in ("protocol/codec.py", "broker/server.py", "client/sync.py", "cli.py"):
        assert f"tether/{module}" in names
    info = zipfile.ZipFile(wheel)
    [entry_points] = [n for n in names if n.endswith("entry_points.txt")]
    assert "tether = tether.cli:main" in info.read(entry_points).decode()
    [metadata] = [n for n in names if n.endswith("/METADATA")]
    assert f"Version: {__version__}" in info.read(metadata).decode()
