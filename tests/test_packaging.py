"""The wheel ships the Lua scripts inside the package, and the installed copy finds them."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_contains_luascripts_and_loads_them(tmp_path):
    uv = shutil.which("uv")
    assert uv, "uv must be on PATH (the justfile runs the suite through uv)"
    subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp_path), str(ROOT)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "scheduler/ops/static/status.html" in names
    shipped = {n.removeprefix("scheduler/luascripts/") for n in names if n.startswith("scheduler/luascripts/")}
    assert shipped == {str(p.relative_to(ROOT / "luascripts")) for p in (ROOT / "luascripts").rglob("*.lua")}
    # Unpacked on its own (no checkout next to it), the package loads its scripts from inside.
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = ("import scheduler.store.redis_adapter as r; d = r.scripts_dir(); "
            "assert 'site' in str(d), d; print(sorted(r.load_script_sources()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "dispatch_task" in out.stdout
