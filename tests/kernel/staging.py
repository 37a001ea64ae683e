"""tcpstate staged where another user and the pod and unit stand-ins can
run it, whatever the checkout's place.

Some kernel tests run tcpstate as another user (nobody; the unit's
tcpstate user), as root without the capabilities that read any file, in a
stand-in for the DaemonSet's pod (an empty /tmp), or under systemd (its
ProtectHome= hides /root and /home, PrivateTmp= /tmp and /var/tmp). A
checkout in root's home (0700) or under /tmp cannot be run from there, so
these tests run a copy: a venv of its own (with the system site-packages,
for Debian's bcc), the runtime dependencies the project's venv installed,
the tracer package with bpf/ inside it as the wheel lays it out, the
`tcpstate` script and the container's entrypoint; everything readable by
all, in /opt, which none of the stand-ins hides. The copy is removed when
the session ends; one a killed session left is removed by the next.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
import venv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ..hygiene import STAND_IN_PREFIX
from ..unit.deploy_files import ENTRYPOINT
from ..unit.deploy_files import ROOT as CHECKOUT

STAGE_PARENT = Path("/opt")
PROJECT = "tcpstate"


@dataclass(frozen=True)
class Staged:
    root: Path
    tcpstate: Path  # the console script
    entrypoint: Path  # deploy/container/entrypoint.sh


def _runtime_distributions() -> list[importlib.metadata.Distribution]:
    """The installed distributions tcpstate needs to run (no extras)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = [PROJECT]
    while pending:
        name = canonicalize_name(pending.pop())
        if name in found:
            continue
        found[name] = importlib.metadata.distribution(name)
        for text in found[name].requires or ():
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    del found[PROJECT]
    return list(found.values())


def _copy_distribution(distribution: importlib.metadata.Distribution, site: Path) -> None:
    base = Path(distribution.locate_file("")).resolve()
    for entry in distribution.files or ():
        if entry.parts[0] == "..":
            continue  # scripts in the venv's bin/: tcpstate runs none of them
        source = base / entry
        if source.is_file():
            (site / entry).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, site / entry)
            shutil.copymode(source, site / entry)


def _console_script(python: Path) -> str:
    (entry,) = [point for point in importlib.metadata.distribution(PROJECT).entry_points
                if point.group == "console_scripts" and point.name == PROJECT]
    return (f"#!{python}\nimport sys\nfrom {entry.module} import {entry.attr}\n"
            f"sys.exit({entry.attr}())\n")


def _readable_by_all(root: Path) -> None:
    """Whatever the umask was: directories 0755, files 0644 (0755 if executable)."""
    for directory, subdirectories, files in os.walk(root):
        os.chmod(directory, 0o755)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):  # a link's mode is its target's: the system's python
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, 0o755 if executable else 0o644)


def remove_stale_stages() -> None:
    """Copies a killed session left: those whose pid (in the name) is gone."""
    for path in STAGE_PARENT.glob(f"{STAND_IN_PREFIX}*"):
        pid = path.name[len(STAND_IN_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(path, ignore_errors=True)


def stage(root: Path) -> Staged:
    """Lay the copy out in the empty directory `root`."""
    environment = root / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True).create(environment)
    site = environment / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
        "site-packages"
    system_sites = [Path(path).resolve() for path in sys.path if path.endswith("dist-packages")]
    for distribution in _runtime_distributions():
        base = Path(distribution.locate_file("")).resolve()
        if base not in system_sites:  # those the copy's venv sees as it is
            _copy_distribution(distribution, site)
    shutil.copytree(CHECKOUT / "tracer", site / "tracer",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(CHECKOUT / "bpf", site / "tracer" / "bpf")
    script = environment / "bin" / PROJECT
    script.write_text(_console_script(environment / "bin" / "python"))
    script.chmod(0o755)
    entrypoint = root / "entrypoint.sh"
    shutil.copyfile(ENTRYPOINT, entrypoint)
    entrypoint.chmod(0o755)
    _readable_by_all(root)
    return Staged(root, script, entrypoint)


@contextlib.contextmanager
def staged() -> Iterator[Staged]:
    remove_stale_stages()
    root = Path(tempfile.mkdtemp(prefix=f"{STAND_IN_PREFIX}{os.getpid()}-", dir=STAGE_PARENT))
    try:
        yield stage(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
