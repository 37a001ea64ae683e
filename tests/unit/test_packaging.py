"""The wheel carries the BPF source, where tracer.probe looks for it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_the_bpf_source(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = tmp_path.glob("tcpstate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "tracer/probe.py" in names
    for source in ("tcpstate.h", "serve.bpf.c", "trace.bpf.c"):
        assert (ROOT / "bpf" / source).read_bytes() == \
            zipfile.ZipFile(wheel).read(f"tracer/bpf/{source}")
    assert not any(name.startswith("tests/") for name in names)
