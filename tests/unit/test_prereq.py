"""The kernel version and path checks that run before any BPF is compiled."""

from __future__ import annotations

import pytest

from tracer.errors import EXIT_HEADERS, EXIT_KERNEL_VERSION, PrerequisiteError
from tracer.features import CMPXCHG, MMAPABLE, RINGBUF
from tracer.prereq import (SERVE_NEEDS, TRACE_NEEDS, check_headers,
                           check_kernel, parse_release)


@pytest.mark.parametrize("release, parsed", [
    ("6.18.0-1-amd64", (6, 18)), ("5.6.0", (5, 6)), ("4.19.0-27-cloud-amd64", (4, 19)),
    ("6.1", (6, 1)), ("garbage", None), ("", None),
])
def test_parse_release(release, parsed):
    assert parse_release(release) == parsed


def test_versions_compare_as_numbers_not_text():
    check_kernel("5.15.0", ((5, 6), "a need"))  # "5.15" < "5.6" as text
    with pytest.raises(PrerequisiteError) as refused:
        check_kernel("5.11.19", ((5, 12), "a need"))
    assert refused.value.exit_code == EXIT_KERNEL_VERSION


def test_the_commands_need_the_features_their_programs_use():
    assert set(SERVE_NEEDS) == {CMPXCHG, MMAPABLE}
    assert set(TRACE_NEEDS) == {CMPXCHG, RINGBUF}
    # each use names its command, for the one line of exit 9
    assert all(use.startswith("serve ") for use in SERVE_NEEDS.values())
    assert all(use.startswith("trace ") for use in TRACE_NEEDS.values())


def test_unreadable_headers_are_missing_headers_not_a_traceback(tmp_path, monkeypatch):
    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(tmp_path), "is_dir", refuse)
    with pytest.raises(PrerequisiteError) as missing:
        check_headers(tmp_path, allow_kheaders=False)
    assert missing.value.exit_code == EXIT_HEADERS
