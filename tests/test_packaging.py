"""A plain (non-editable) install carries what the demo needs: the shipped teachers are package data."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_demo_teachers(tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(REPO)],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("mtpd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("weak.pt", "strong.pt", "mbv2.pt", "mbv2_60ep.pt", "swin.pt", "manifest.json", "nanodet_g/mapping.yaml"):
        assert f"mtpd/demo/teachers/{f}" in names, f
    # Installed on its own (no source tree in reach), the demo finds them through importlib.resources.
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    code = (
        "import json, mtpd\n"
        "from mtpd.demo.steps import shipped_teachers\n"
        "from mtpd.checkpoint import sha256_file\n"
        "folder = shipped_teachers()\n"
        "manifest = json.loads((folder / 'manifest.json').read_text())\n"
        "ok = {k: sha256_file(folder / f'{k}.pt') == manifest[k]['sha256'] for k in ('weak', 'strong', 'mbv2')}\n"
        "print(json.dumps({'pkg': mtpd.__file__, 'folder': str(folder), 'ok': ok}))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["pkg"].startswith(str(site)) and got["folder"].startswith(str(site)), got
    assert got["ok"] == {"weak": True, "strong": True, "mbv2": True}
