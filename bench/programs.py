"""The BPF programs figure 1 times beside tcpstate's own: an empty program
of either attach type (the floor), and the feature-cost variants of serve's
program, which live here so that bpf/serve.bpf.c has no bench-only code:

- "counters only": bench/counters.bpf.c, the transition counters alone on
  the shared reading of a state change (bpf/tcpstate.h);
- "+ socket table": bpf/serve.bpf.c as it is, with the bodies of its two
  histogram functions emptied in the text bcc compiles (`without_histograms`);
- serve's default less the 4-tuple hash its entries keep for `tcpstate
  sockets` (`without_tuple_hash`).

Each is a tracer.probe.LoadedProgram: compiled with the cflags tcpstate
uses, configured, attached; `detach()`/`attach()` time them one at a time.
"""

from __future__ import annotations

import re
from pathlib import Path

from tracer.probe import LoadedProgram, bpf_source
from tracer.program import (FUNCTION, RAW_TRACEPOINT, RAW_TRACEPOINT_NAME, TRACEPOINT,
                            TRACEPOINT_NAME)

HERE = Path(__file__).resolve().parent
EMPTY = HERE / "empty.bpf.c"
COUNTERS_ONLY = HERE / "counters.bpf.c"
HISTOGRAM_FUNCTIONS = ("observe_state", "observe_connection")


def without_histograms(source: str) -> str:
    """serve.bpf.c's text with the bodies of its histogram functions
    emptied: the program still counts, tracks every socket and keeps the
    gauge, and observes no duration. Fails loudly when serve.bpf.c no
    longer has the functions this relies on."""
    for name in HISTOGRAM_FUNCTIONS:
        # the definition's body runs to the first closing brace in column 0
        pattern = re.compile(r"(static __always_inline void " + name + r"\([^)]*\)\s*)\{.*?\n\}",
                             re.DOTALL)
        source, found = pattern.subn(r"\1{}", source, count=1)
        if not found:
            raise RuntimeError(f"bench: bpf/serve.bpf.c has no function {name}() to empty "
                               "for the '+ socket table' variant of figure 1")
    return source


class SourceVariant(LoadedProgram):
    """A program built from `text` instead of bpf/serve.bpf.c, with serve's
    cflags; maps it lacks are not read."""

    command = "serve"

    def __init__(self, text: str, **options):
        self.text = text
        super().__init__(**options)

    def _load(self, source, flags, attachment):
        from bcc import BPF

        bpf = BPF(text=self.text.encode(), cflags=flags)
        kind = BPF.RAW_TRACEPOINT if attachment.kind == RAW_TRACEPOINT else BPF.TRACEPOINT
        bpf.load_func(FUNCTION.encode(), kind)
        return bpf


TUPLE_HASH_LINE = "    entry->tuple_hash = tuple_hash_of(ctx, &c);\n"


def without_tuple_hash(source: str) -> str:
    """serve.bpf.c's text without the entry's 4-tuple hash (what `tcpstate
    sockets` matches by): its cost on the hot path, side by side."""
    if TUPLE_HASH_LINE not in source:
        raise RuntimeError("bench: bpf/serve.bpf.c no longer writes entry->tuple_hash as "
                           "the 'less the 4-tuple hash' variant of figure 1 expects")
    return source.replace(TUPLE_HASH_LINE, "")


def serve_without_tuple_hash(**options) -> SourceVariant:
    return SourceVariant(without_tuple_hash(bpf_source("serve").read_text()), **options)


def counters_only(**options) -> SourceVariant:
    return SourceVariant(COUNTERS_ONLY.read_text(), **options)


def socket_table_without_histograms(**options) -> SourceVariant:
    return SourceVariant(without_histograms(bpf_source("serve").read_text()), **options)


class EmptyProgram:
    """bench/empty.bpf.c loaded as `kind` (RAW_TRACEPOINT or TRACEPOINT),
    attached on entry unless attached=False."""

    def __init__(self, kind: str, attached: bool = True):
        self.kind = kind
        self.start_attached = attached
        self.attached = False

    def __enter__(self) -> "EmptyProgram":
        from bcc import BPF

        self.bpf = BPF(src_file=str(EMPTY).encode())
        self.bpf.load_func(FUNCTION.encode(), BPF.RAW_TRACEPOINT if self.kind == RAW_TRACEPOINT
                           else BPF.TRACEPOINT)
        if self.start_attached:
            self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.bpf.cleanup()

    def attach(self) -> None:
        if self.kind == RAW_TRACEPOINT:
            self.bpf.attach_raw_tracepoint(tp=RAW_TRACEPOINT_NAME.encode(),
                                           fn_name=FUNCTION.encode())
        else:
            self.bpf.attach_tracepoint(tp=TRACEPOINT_NAME.encode(), fn_name=FUNCTION.encode())
        self.attached = True

    def detach(self) -> None:
        if self.kind == RAW_TRACEPOINT:
            self.bpf.detach_raw_tracepoint(RAW_TRACEPOINT_NAME.encode())
        else:
            self.bpf.detach_tracepoint(TRACEPOINT_NAME.encode())
        self.attached = False

    def prog_stats(self) -> dict[str, int]:
        fd = self.bpf.funcs[FUNCTION.encode()].fd
        with open(f"/proc/self/fdinfo/{fd}") as info:
            return {key: int(value) for key, _, value in
                    (line.partition(":") for line in info)
                    if key in ("run_time_ns", "run_cnt", "recursion_misses", "prog_id")}


PATHS = (RAW_TRACEPOINT, TRACEPOINT)
