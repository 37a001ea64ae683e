"""The programs as the kernels of the matrix will see them, checked on the
host in seconds: a shape that Linux 6.1 refuses costs a VM run minutes to
find (`make test-kernels`)."""

from __future__ import annotations

import pytest

from tracer.probe import FUNCTION, bpf_source
from tracer.program import (DEFAULT_SOCKET_TABLE_SIZE, RAW_TRACEPOINT, TRACEPOINT,
                            choose_attachment, cflags, table_rows)

from .bpf_cfg import refused_back_edges


def compiled(command: str, kind: str, port_slots: int, release: str,
             extra: tuple[str, ...] = ()) -> bytes:
    from bcc import BPF

    flags = cflags(choose_attachment(kind), port_slots, table_rows(DEFAULT_SOCKET_TABLE_SIZE),
                   2, release=release) + list(extra)
    if command == "trace":
        flags.append("-DRINGBUF_PAGES=64")
    bpf = BPF(src_file=str(bpf_source(command)).encode(), cflags=flags)
    try:
        return bpf.dump_func(FUNCTION.encode())
    finally:
        bpf.cleanup()


@pytest.mark.parametrize("release", ["5.15.0-1-amd64", "6.1.0-57-amd64"])
@pytest.mark.parametrize("kind", [RAW_TRACEPOINT, TRACEPOINT])
@pytest.mark.parametrize("command,port_slots", [("serve", 1), ("serve", 4), ("trace", 1)])
def test_no_loop_entered_in_its_middle(command, port_slots, kind, release):
    """Linux 6.1 refused serve's program ("back-edge from insn 502 to 503"):
    clang had made a compare-and-swap loop that it entered in the middle."""
    assert refused_back_edges(compiled(command, kind, port_slots, release)) == []


@pytest.mark.parametrize("command", ["serve", "trace"])
def test_close_reasons_read_in_two_where_the_fields_lie_apart(command):
    """Debian 12's 6.1 puts sk_lock far before sk_err (SK_CLOSE_SPLIT): the
    program that reads them one by one compiles, without loops."""
    attachment = choose_attachment(RAW_TRACEPOINT)
    assert attachment.close_reasons
    program = compiled(command, RAW_TRACEPOINT, 1, "6.1.0-57-amd64", ("-DSK_CLOSE_SPLIT=1",))
    assert refused_back_edges(program) == []


def test_the_check_finds_a_loop_entered_in_its_middle():
    # 0: ja +1 -> 2;  1: r0 += 1;  2: if r0 != 0 goto -2 -> 1 (falls through to 3);
    # 3: exit. The walk reaches 2 first, then 1 by the jump: 1 -> 2 falls through.
    program = bytes.fromhex("0500010000000000" "0700000001000000"
                            "5500feff00000000" "9500000000000000")
    assert refused_back_edges(program) == [(1, 2)]
