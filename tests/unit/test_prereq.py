"""The kernel version and path checks that run before any BPF is compiled."""

from __future__ import annotations

import pytest

from tracer.errors import EXIT_HEADERS, EXIT_KERNEL_VERSION, PrerequisiteError
from tracer.prereq import (SERVE_NEEDS, TRACE_NEEDS, check_headers,
                           check_kernel, parse_release)


@pytest.mark.parametrize("release, parsed", [
    ("6.18.0-1-amd64", (6, 18)), ("5.6.0", (5, 6)), ("4.19.0-27-cloud-amd64", (4, 19)),
    ("6.1", (6, 1)), ("garbage", None), ("", None),
])
def test_parse_release(release, parsed):
    assert parse_release(release) == parsed


def test_versions_compare_as_numbers_not_text():
    check_kernel("5.15.0", SERVE_NEEDS, TRACE_NEEDS)  # "5.15" < "5.6" as text
    with pytest.raises(PrerequisiteError) as refused:
        check_kernel("5.11.19", SERVE_NEEDS)
    assert refused.value.exit_code == EXIT_KERNEL_VERSION


@pytest.mark.parametrize("release, needs, ok", [
    ("5.12.0", (SERVE_NEEDS,), True), ("5.10.0", (SERVE_NEEDS,), False),
    ("5.11.0", (TRACE_NEEDS,), False), ("5.12.0", (TRACE_NEEDS,), True), ("5.11.0", (SERVE_NEEDS,), False),
    ("6.4.0", (SERVE_NEEDS,), True), ("custom", (SERVE_NEEDS, TRACE_NEEDS), True),
])
def test_each_need_has_its_minimum(release, needs, ok):
    if ok:
        check_kernel(release, *needs)
    else:
        with pytest.raises(PrerequisiteError, match=f"Linux {release} is too old"):
            check_kernel(release, *needs)


def test_unreadable_headers_are_missing_headers_not_a_traceback(tmp_path, monkeypatch):
    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(tmp_path), "is_dir", refuse)
    with pytest.raises(PrerequisiteError) as missing:
        check_headers(tmp_path, allow_kheaders=False)
    assert missing.value.exit_code == EXIT_HEADERS
