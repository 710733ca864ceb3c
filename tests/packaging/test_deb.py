"""tools/build-deb.sh: the Debian package builds, holds every file where Debian expects
it with the right mode, depends on Debian's python3-* modules (and not on onnxruntime,
which Debian does not package), is lintian-clean of errors, and its commands run from
the unpacked tree against the system's python3."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "build-deb.sh"
SYSTEM_PYTHON = Path("/usr/bin/python3")

pytestmark = pytest.mark.slow


def _version() -> str:
    text = (ROOT / "ailfmd" / "__init__.py").read_text()
    m = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    assert m, "ailfmd/__init__.py has no __version__"
    return m.group(1)


def _why_not_buildable() -> str | None:
    """None when the build can run here; otherwise the reason it cannot."""
    if shutil.which("dpkg") is None:
        return "not a Debian-based system (no dpkg)"
    have_tools = shutil.which("dpkg-buildpackage") and shutil.which("lintian")
    if have_tools:
        return None
    if shutil.which("apt-get") is None:
        return "dpkg-buildpackage/lintian are missing and there is no apt-get to install them"
    if os.geteuid() != 0 and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode != 0:
        return "dpkg-buildpackage/lintian are missing; installing them needs root or passwordless sudo"
    return None


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _why_not_buildable()
    if reason:
        pytest.skip(f"cannot build the Debian package here: {reason}")
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run([str(SCRIPT), str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"build-deb.sh failed:\n{proc.stdout}\n{proc.stderr}"
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path == out / f"ailfmd_{_version()}_all.deb"
    assert path.is_file()
    assert [p.name for p in out.iterdir()] == [path.name], "only the .deb lands in OUTDIR"
    return path


@pytest.fixture(scope="module")
def contents(deb: Path) -> dict[str, tuple[str, str]]:
    """path (without the leading '.') -> (mode string, owner/group)."""
    out = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True).stdout
    entries: dict[str, tuple[str, str]] = {}
    for line in out.splitlines():
        mode, owner, _size, _date, _time, name, *_ = line.split()
        entries[name.removeprefix(".").rstrip("/") or "/"] = (mode, owner)
    return entries


@pytest.fixture(scope="module")
def control(deb: Path) -> dict[str, str]:
    out = subprocess.run(["dpkg-deb", "--field", str(deb)], capture_output=True, text=True, check=True).stdout
    fields: dict[str, str] = {}
    key = ""
    for line in out.splitlines():
        if line[:1].isspace():
            fields[key] += "\n" + line.strip()
        else:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


@pytest.fixture(scope="module")
def maint_scripts(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("DEBIAN")
    subprocess.run(["dpkg-deb", "-e", str(deb), str(d)], check=True)
    return d


EXPECTED_FILES = {
    # path: mode
    "/usr/bin/ailfmd": "-rwxr-xr-x",
    "/usr/bin/ailfmctl": "-rwxr-xr-x",
    "/usr/bin/ailfm": "-rwxr-xr-x",
    "/lib/systemd/system/ailfmd.service": "-rw-r--r--",
    "/etc/ailfmd/ailfmd.toml": "-rw-r--r--",
    "/usr/lib/sysusers.d/ailfmd.conf": "-rw-r--r--",
    "/usr/share/ailfmd/policies/README.md": "-rw-r--r--",
    "/usr/share/doc/ailfmd/copyright": "-rw-r--r--",
    "/usr/share/doc/ailfmd/changelog.gz": "-rw-r--r--",
    "/usr/share/doc/ailfmd/README.md.gz": "-rw-r--r--",
    "/usr/share/man/man8/ailfmd.8.gz": "-rw-r--r--",
    "/usr/share/man/man1/ailfmctl.1.gz": "-rw-r--r--",
    "/usr/share/man/man1/ailfm.1.gz": "-rw-r--r--",
    "/usr/lib/python3/dist-packages/ailfmd/__init__.py": "-rw-r--r--",
    "/usr/lib/python3/dist-packages/ailfmd/service/daemon.py": "-rw-r--r--",
    "/usr/lib/python3/dist-packages/ailfmd/ctl/cli.py": "-rw-r--r--",
    "/usr/lib/python3/dist-packages/ailfmd/lab/cli.py": "-rw-r--r--",
    "/usr/lib/python3/dist-packages/ailfmd/sim/chips/3d-64.toml": "-rw-r--r--",
    "/usr/lib/python3/dist-packages/ailfmd/sim/workloads/mixed.toml": "-rw-r--r--",
    "/usr/lib/python3/dist-packages/ailfmd/sim/workloads/models/llama2-7b.toml": "-rw-r--r--",
}


def test_files_paths_and_modes(contents: dict[str, tuple[str, str]]) -> None:
    for path, mode in EXPECTED_FILES.items():
        assert path in contents, f"{path} missing from the package"
        assert contents[path] == (mode, "root/root"), f"{path}: {contents[path]}"
    assert any(p.startswith("/usr/lib/python3/dist-packages/ailfmd-") and p.endswith(".dist-info") for p in contents)
    for path, (mode, owner) in contents.items():
        assert owner == "root/root", path
        if mode.startswith("d"):
            assert mode == "drwxr-xr-x", path
        # Nothing setuid/setgid or world-writable.
        assert "s" not in mode and mode[8] != "w", path


def test_nothing_from_the_working_tree_leaks_in(contents: dict[str, tuple[str, str]]) -> None:
    for path in contents:
        parts = set(path.split("/"))
        assert not parts & {".venv", ".run", "bench-results", "dist", "tests", "fixtures", "__pycache__", "debian"}, path
        assert not path.endswith((".pyc", ".tar.gz", ".egg-info")), path
    # Not installed: no enabled-by-default symlink, no tmpfiles entry (RuntimeDirectory= does it).
    assert not any("/wants/" in p or "multi-user.target" in p for p in contents)
    assert not any("tmpfiles.d" in p for p in contents)


def test_shipped_files_are_the_source_files(unpacked: Path) -> None:
    pairs = {
        "lib/systemd/system/ailfmd.service": "systemd/ailfmd.service",
        "etc/ailfmd/ailfmd.toml": "packaging/ailfmd.toml",
        "usr/lib/sysusers.d/ailfmd.conf": "packaging/sysusers.d/ailfmd.conf",
        "usr/share/ailfmd/policies/README.md": "policies/README.md",
    }
    for installed, source in pairs.items():
        assert (unpacked / installed).read_bytes() == (ROOT / source).read_bytes(), installed
    for src in (ROOT / "policies").iterdir():
        assert (unpacked / "usr/share/ailfmd/policies" / src.name).is_file(), src.name


def test_control_fields(control: dict[str, str], deb: Path) -> None:
    assert control["Package"] == "ailfmd"
    assert control["Version"] == _version()
    assert control["Architecture"] == "all"
    assert control["Section"] == "admin"
    depends = {d.strip().split()[0] for d in control["Depends"].split(",")}
    for pkg in ("python3-numpy", "python3-psutil", "python3-pyudev", "python3-prometheus-client", "adduser"):
        assert pkg in depends, f"{pkg} not in Depends: {control['Depends']}"
    assert any(d.startswith("python3") and ":any" in d or d == "python3" for d in depends)
    everything = " ".join(control.get(k, "") for k in ("Depends", "Pre-Depends", "Recommends", "Suggests"))
    assert "onnxruntime" not in everything, "Debian 12 has no onnxruntime package"
    assert "python3-systemd" in control["Recommends"]
    assert "ONNX" in control["Description"]


def test_conffile_and_maintainer_scripts(maint_scripts: Path) -> None:
    assert (maint_scripts / "conffiles").read_text().split() == ["/etc/ailfmd/ailfmd.toml"]
    postinst = (maint_scripts / "postinst").read_text()
    assert "systemd-sysusers" in postinst and "ailfmd.conf" in postinst
    assert "adduser --system --group" in postinst
    # Installed but not enabled (dh_installsystemd --no-enable): the unit is enabled again
    # only on upgrades of an installation where the operator had enabled it, and
    # deb-systemd-invoke does not start a disabled unit.
    assert "if deb-systemd-helper debian-installed 'ailfmd.service'; then" in postinst
    prerm = (maint_scripts / "prerm").read_text()
    assert "deb-systemd-invoke stop 'ailfmd.service'" in prerm  # SIGTERM restores every change
    subprocess.run(["sh", "-n", str(maint_scripts / "postinst")], check=True)


def test_lintian_has_no_errors_and_every_warning_is_documented(deb: Path) -> None:
    proc = subprocess.run(
        ["lintian", "--tag-display-limit", "0", str(deb)], capture_output=True, text=True, timeout=300
    )
    errors = [line for line in proc.stdout.splitlines() if line.startswith("E: ")]
    assert errors == [], "\n".join(errors)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # A warning is acceptable only when docs/packaging.md explains it.
    doc = (ROOT / "docs" / "packaging.md").read_text()
    for line in proc.stdout.splitlines():
        m = re.match(r"^W: ailfmd: (\S+)", line)
        if m:
            assert f"`{m.group(1)}" in doc, f"lintian warning not explained in docs/packaging.md: {line}"


@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="no /usr/bin/python3")
def test_installed_commands_run(unpacked: Path, tmp_path: Path) -> None:
    site = unpacked / "usr/lib/python3/dist-packages"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path), "LC_ALL": "C.UTF-8"}
    for script in ("ailfmd", "ailfmctl", "ailfm"):
        exe = unpacked / "usr/bin" / script
        assert exe.read_text().startswith("#!/usr/bin/python3\n"), script
        proc = subprocess.run(
            [str(SYSTEM_PYTHON), str(exe), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
        )
        assert proc.returncode == 0, f"{script} --help:\n{proc.stderr}"
        assert f"usage: {script}" in proc.stdout
    # The code really comes from the unpacked tree, not from a checkout or a venv.
    where = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import ailfmd; print(ailfmd.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(site)

    # ailfmctl sensors against a committed machine layout, from the packaged code.
    with tarfile.open(ROOT / "tests/fixtures/epyc-k10temp/sys.tar.gz") as tar:
        tar.extractall(tmp_path / "epyc", filter="tar")
    proc = subprocess.run(
        [str(SYSTEM_PYTHON), str(unpacked / "usr/bin/ailfmctl"), "sensors", "--json", "--sysfs-root", str(tmp_path / "epyc/sys")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.lstrip().startswith("{")

    # The daemon runs a few epochs on the simulated chip with the shipped config's policy
    # section (onnx, no runtime in Debian) and falls back to its baseline.
    run = tmp_path / "run"
    proc = subprocess.run(
        [str(SYSTEM_PYTHON), str(unpacked / "usr/bin/ailfmd"), "--config", str(unpacked / "etc/ailfmd/ailfmd.toml"),
         "--platform", "sim", "--chip", "tiny", "--workload", "mixed", "--epochs", "3",
         "--run-dir", str(run), "--metrics-port", "0"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime Python module is not installed" in proc.stderr and "stepwise decides" in proc.stderr
