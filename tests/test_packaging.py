"""The built wheel works outside the checkout: a fresh venv with only the wheel installed scores a film
from an unrelated folder with the shipped model, and xr-results finds what the daemon wrote.

Installing torch into a fresh venv costs minutes and gigabytes, so the fresh venv gets the project's
wheel alone (``--no-deps``) and reaches the already installed dependencies through a ``.pth`` line; the
checkout's own editable hook lives in that site folder but is not processed from a ``.pth`` path line, and
the test checks that ``xr`` is imported from the fresh venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs", "inbox", "output", "tests"
)


# the daemon's CPU forward, eager, and no heatmaps: what this file tests is the install, not those features
QUICK = ("--device", "cpu", "--set", "daemon.heatmaps=none", "--set", "daemon.cpu_trace=false")


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(REPO, src, ignore=SKIP)  # a build writes build/ and egg-info: not into the checkout
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", work / "dist", src])
    wheels = list((work / "dist").glob("xr_triage-*.whl"))
    assert len(wheels) == 1
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            venv / "bin" / "python",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            wheels[0],
        ]
    )
    site = Path(
        _run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return venv


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XR_", "PYTHON"))}
    return env | {"HOME": str(home), "XDG_DATA_HOME": str(home / "data")}


def test_the_wheel_carries_config_recipe_and_model(fresh_venv, tmp_path):
    code = (
        "import json, xr.core.config as c; "
        "print(json.dumps([c.__file__, str(c.SETTINGS_PATH), str(c.RECIPE_PATH), str(c.SHIPPED_MODEL), "
        "c.SETTINGS_PATH.is_file(), c.RECIPE_PATH.is_file(), c.SHIPPED_MODEL.is_file(), "
        "(c.SHIPPED_MODEL.parent / 'calibration_threshold.json').is_file()]))"
    )
    out = json.loads(_run([fresh_venv / "bin" / "python", "-c", code], cwd=tmp_path, env=_env(tmp_path)).stdout)
    for path in out[:4]:
        assert path.startswith(str(fresh_venv)), f"{path} is not from the installed wheel"
    assert all(out[4:]), out


def test_daemon_and_results_work_from_an_unrelated_folder(fresh_venv, tmp_path, xray_paths):
    inbox, output = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    film = xray_paths[-1]
    shutil.copy(film, inbox / film.name)
    os.utime(inbox / film.name, (1, 1))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = _env(tmp_path)
    bin_ = fresh_venv / "bin"
    r = _run([bin_ / "xr-daemon", "--watch", inbox, "--output", output, "--once", *QUICK], cwd=cwd, env=env)
    ready = next(json.loads(line) for line in r.stderr.splitlines() if '"model_ready"' in line)
    assert ready["model"].startswith(str(fresh_venv)) and ready["model"].endswith("xr_mvp_best.pt")  # the shipped model
    assert (output / "processed" / film.name).is_file()
    listed = _run(
        [bin_ / "xr-results", "--db", output / "results.sqlite", "list", "--format", "json"], cwd=cwd, env=env
    )
    rows = json.loads(listed.stdout)
    assert [(r["filename"], r["status"]) for r in rows] == [(film.name, "ok")]
    assert rows[0]["model_id"].startswith("efficientnet_lite0-")

    # With no --output and no --db both use the same default: the user's data folder.
    second = tmp_path / "in2"
    second.mkdir()
    shutil.copy(xray_paths[0], second / xray_paths[0].name)
    _run([bin_ / "xr-daemon", "--watch", second, "--once", *QUICK], cwd=cwd, env=env)
    assert (tmp_path / "data" / "xr-triage" / "output" / "results.sqlite").is_file()
    rows = json.loads(_run([bin_ / "xr-results", "list", "--format", "json"], cwd=tmp_path, env=env).stdout)
    assert [r["filename"] for r in rows] == [xray_paths[0].name]


def test_xr_train_evaluates_the_shipped_model_from_the_wheel(fresh_venv, tmp_path, fixtures_dir):
    r = _run(
        [
            fresh_venv / "bin" / "xr-train",
            "evaluate",
            "--data",
            fixtures_dir / "chest_xray" / "train",
            "--out",
            tmp_path / "eval",
            "--device",
            "cpu",
        ],
        cwd=tmp_path,
        env=_env(tmp_path),
    )
    assert "evaluate (27 images)" in r.stdout
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 27
