"""Which BPF program to build, and how it attaches: the raw tracepoint
inet_sock_set_state with socket offsets from the running kernel's BTF, or
the classic tracepoint sock:inet_sock_set_state where there is no BTF.

Why the raw tracepoint is preferred: while any map is read by system call
(ours at a scrape, or another agent's) or another tracing program runs on a
CPU, the kernel skips every classic-tracepoint program on that CPU (counted
only since Linux 6.7). A raw tracepoint program is guarded per program
(since 6.1): only its own nested run is skipped, and counted.

This module decides; tracer/probe.py compiles, loads and attaches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .btf import Btf, BtfError
from .errors import EXIT_BPF, TcpstateError, UsageError
from .features import BTF as BTF_FEATURE, RAW_TRACEPOINT as RAW_TRACEPOINT_FEATURE, Features
from .metrics import BUCKET_MIN_LOG2, MAX_SERVICE_PORTS, NBUCKETS
from .prereq import kernel_release, parse_release
from .reasons import CODE as REASON_CODE, NERRNO_SLOTS, NO_REASON, NREASONS
from .states import NSTATES

log = logging.getLogger(__name__)

RAW_TRACEPOINT = "raw_tracepoint"
TRACEPOINT = "tracepoint"
AUTO = "auto"
ATTACH_CHOICES = (AUTO, RAW_TRACEPOINT, TRACEPOINT)
RAW_TRACEPOINT_NAME = "inet_sock_set_state"
TRACEPOINT_NAME = "sock:inet_sock_set_state"
FUNCTION = "on_state_change"

# Sockets per socket-table row: 8 keys fill one cache line, so a lookup
# reads one line of keys and one of its entry. With 262,144 entries, 100k
# live sockets average 3 per row and a full row (an eviction) stays rare
# (BENCHMARKS.md measures it).
TABLE_WAYS = 8
MIN_SOCKET_TABLE_SIZE = 16
DEFAULT_SOCKET_TABLE_SIZE = 262_144
MAX_SOCKET_TABLE_SIZE = 1 << 24

# The order of `enum counter` in bpf/tcpstate.h (a unit test compares).
COUNTERS = (
    "evictions",
    "duration_unknown",
    "other_protocol",
    "ringbuf_drops",
    "trace_matched",
    "stale_entries",
    "unseen_sockets",
    "contended",
)

# What the raw tracepoint program reads, cflag -> (struct, member path):
# the members the classic tracepoint itself reads for its record.
SOCKET_MEMBERS = {
    "SK_FAMILY": ("sock", "__sk_common.skc_family"),
    "SK_DPORT": ("sock", "__sk_common.skc_dport"),
    "SK_NUM": ("sock", "__sk_common.skc_num"),
    "SK_PROT": ("sock", "__sk_common.skc_prot"),
    "SK_DADDR": ("sock", "__sk_common.skc_daddr"),
    "SK_SADDR": ("sock", "__sk_common.skc_rcv_saddr"),
    "SK_V6_DADDR": ("sock", "__sk_common.skc_v6_daddr"),
    "SK_V6_SADDR": ("sock", "__sk_common.skc_v6_rcv_saddr"),
    "SK_PROTOCOL": ("sock", "sk_protocol"),
    "SK_SPORT": ("inet_sock", "inet_sport"),
}
# The members of struct sock_common above are read with one copy: the span
# from the first to the end of the last (88 bytes on 6.18), SK_HEAD and
# SK_HEAD_LEN. A copy costs about as much whatever its length up to there;
# each one more is a helper call on every event.
HEAD_MEMBERS = ("SK_FAMILY", "SK_DPORT", "SK_NUM", "SK_PROT", "SK_DADDR", "SK_SADDR",
                "SK_V6_DADDR", "SK_V6_SADDR")
MAX_HEAD_LEN = 256
# Read by trace only: whether the current task is a kernel thread.
TASK_MEMBERS = {"TASK_FLAGS": ("task_struct", "flags")}
# Read only at a transition into CLOSE, for its reason (tracer/reasons.py):
# the error stored for the owner, and whether a process holds the socket
# (lock_sock() in its system call) rather than softirq or a timer. Both in
# one copy of the span between them (44 bytes on 6.18); a kernel where it
# is wider, or a member is missing, runs without reasons.
CLOSE_MEMBERS = {"SK_ERR": ("sock", "sk_err"), "SK_OWNED": ("sock", "sk_lock.owned")}
MAX_CLOSE_SPAN = 128

# Before 6.1 a raw tracepoint program may interrupt itself on one CPU (a
# softirq during a system call's transition): its per-CPU cells then add
# atomically.
RAW_TRACEPOINT_GUARDED_SINCE = (6, 1)


@dataclass(frozen=True)
class Attachment:
    """How the program attaches, and why."""

    kind: str  # RAW_TRACEPOINT or TRACEPOINT
    offsets: dict[str, int]  # cflag -> byte offset (raw tracepoint; trace's task flags)
    reason: str = ""  # why the fallback was taken, for the one warning line

    @property
    def close_reasons(self) -> bool:
        """Whether the program classifies closes: it needs the raw
        tracepoint's `sk` and the CLOSE_MEMBERS offsets from BTF."""
        return self.kind == RAW_TRACEPOINT and "SK_CLOSE" in self.offsets

    @property
    def target(self) -> str:
        return RAW_TRACEPOINT_NAME if self.kind == RAW_TRACEPOINT else TRACEPOINT_NAME

    def describe(self) -> str:
        """For the start-up line: `raw tracepoint inet_sock_set_state`."""
        return f"{self.kind.replace('_', ' ')} {self.target}"


def socket_offsets(btf: Btf) -> dict[str, int]:
    """The cflags of the raw tracepoint's reads; BtfError when one is
    missing, is a bitfield (sk_protocol before Linux 5.6) or is too wide."""
    offsets: dict[str, int] = {}
    ends = []
    for flag, (struct, path) in {**SOCKET_MEMBERS, **TASK_MEMBERS}.items():
        member = btf.member(struct, path)
        offsets[flag] = member.byte_offset
        if flag in HEAD_MEMBERS:
            ends.append(member.byte_offset + member.size)
        if flag == "SK_PROTOCOL":
            if member.size not in (1, 2):
                raise BtfError(f"BTF: sock.sk_protocol is {member.size} bytes, not 1 or 2")
            offsets["SK_PROTOCOL_SIZE"] = member.size
    offsets["SK_HEAD"] = min(offsets[flag] for flag in HEAD_MEMBERS)
    offsets["SK_HEAD_LEN"] = max(ends) - offsets["SK_HEAD"]
    if offsets["SK_HEAD_LEN"] > MAX_HEAD_LEN:
        raise BtfError(f"BTF: the socket's addresses and ports span "
                       f"{offsets['SK_HEAD_LEN']} bytes, more than {MAX_HEAD_LEN}")
    try:
        offsets.update(close_offsets(btf))
    except BtfError as exc:  # said in one line at start (warn_if_reasons_off)
        log.debug("close reasons are off: %s", exc)
    return offsets


def close_offsets(btf: Btf) -> dict[str, int]:
    """The cflags of the reads at a transition into CLOSE (CLOSE_MEMBERS and
    their span, SK_CLOSE and SK_CLOSE_LEN, SK_CLOSE_SPLIT when the span is
    too wide for one copy); BtfError when one is missing or is not a 4-byte
    int."""
    offsets: dict[str, int] = {}
    for flag, (struct, path) in CLOSE_MEMBERS.items():
        member = btf.member(struct, path)
        if member.size != 4:
            raise BtfError(f"BTF: {member.path} is {member.size} bytes, not 4")
        offsets[flag] = member.byte_offset
    start = min(offsets.values())
    offsets["SK_CLOSE"] = start
    offsets["SK_CLOSE_LEN"] = max(offsets.values()) + 4 - start
    if offsets["SK_CLOSE_LEN"] > MAX_CLOSE_SPAN:
        # older layouts of struct sock (Debian 12's 6.1): sk_lock
        # near the start, sk_err far after it: two reads instead of one copy
        offsets["SK_CLOSE_SPLIT"] = 1
    return offsets


def without_close_reasons(attachment: Attachment) -> Attachment:
    """The same attachment with close reasons off (bench/: the program with
    and without them, side by side)."""
    dropped = {*CLOSE_MEMBERS, "SK_CLOSE", "SK_CLOSE_LEN", "SK_CLOSE_SPLIT"}
    return Attachment(attachment.kind,
                      {k: v for k, v in attachment.offsets.items() if k not in dropped},
                      attachment.reason)


REASONS_NEED = ("close reasons need the raw tracepoint and the kernel's BTF "
                "(/sys/kernel/btf/vmlinux); without, they are off")
REASONS_OFF = ("close reasons are off: they need the raw tracepoint and the kernel's "
               "BTF (/sys/kernel/btf/vmlinux)")


def warn_if_reasons_off(attachment: Attachment) -> None:
    """The one line at start that says close reasons are not available,
    unless the fallback's line said it already."""
    if attachment.close_reasons or (attachment.kind == TRACEPOINT and attachment.reason):
        return
    log.warning("%s; attaching to the %s", REASONS_OFF, attachment.describe())


def choose_attachment(requested: str = AUTO, btf_path: str | None = None,
                      features: Features | None = None) -> Attachment:
    """`auto` takes the raw tracepoint where the kernel has it (`features`,
    probed) and BTF gives every offset, else the classic tracepoint (with a
    reason to warn about); a forced raw tracepoint without them is an error."""
    if requested not in ATTACH_CHOICES:
        raise UsageError(f"--attach {requested!r}: expected one of {', '.join(ATTACH_CHOICES)}")
    if requested == TRACEPOINT:
        return Attachment(TRACEPOINT, {}, "")
    if features is not None and not features.has(RAW_TRACEPOINT_FEATURE):
        why = f"no raw tracepoint ({features.probes[RAW_TRACEPOINT_FEATURE].why_not})"
        if requested == RAW_TRACEPOINT:
            features.require({RAW_TRACEPOINT_FEATURE: "--attach raw_tracepoint needs it"})
        return _fallback(why)
    try:
        if btf_path or features is None:
            btf = Btf.load(btf_path) if btf_path else Btf.load()
        elif features.btf is None:
            raise BtfError(features.probes[BTF_FEATURE].why_not)
        else:
            btf = features.btf  # loaded once, by the probe
        return Attachment(RAW_TRACEPOINT, socket_offsets(btf))
    except BtfError as exc:
        if requested == RAW_TRACEPOINT:
            raise TcpstateError(f"--attach raw_tracepoint: {exc}", EXIT_BPF) from None
        return _fallback(str(exc))


def _fallback(reason: str) -> Attachment:
    """The classic tracepoint, with the one warning that says why."""
    log.warning("attaching to the classic tracepoint, which map reads and other "
                "BPF programs can make skip events; close reasons are off: %s", reason)
    return Attachment(TRACEPOINT, {}, reason)


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many CPU numbers the kernel may use (`0-3,8-11` -> 12): the rows
    of the per-CPU cells, indexed by bpf_get_smp_processor_id()."""
    with open(path) as listing:
        text = listing.read().strip()
    highest = max(int(part.split("-")[-1]) for part in text.split(","))
    return highest + 1


def bpf_dir() -> Path:
    """bpf/: inside the installed package (the wheel puts it at tracer/bpf/)
    or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "bpf", here.parent / "bpf"):
        if (candidate / "tcpstate.h").is_file():
            return candidate
    raise TcpstateError(f"bpf/tcpstate.h not found next to {here}", EXIT_BPF)


def cflags(attachment: Attachment, port_slots: int, table_rows: int, cpus: int,
           release: str | None = None) -> list[str]:
    """Every constant the C needs, from its one home here and in tracer/."""
    flags = [
        f"-DNSTATES={NSTATES}",
        f"-DNBUCKETS={NBUCKETS}",
        f"-DBUCKET_MIN_LOG2={BUCKET_MIN_LOG2}",
        f"-DNPORT_SLOTS={port_slots}",
        f"-DTABLE_BUCKETS={table_rows}",
        f"-DTABLE_WAYS={TABLE_WAYS}",
        f"-DNCPUS={cpus}",
        f"-DNO_REASON={NO_REASON}",
        f"-I{bpf_dir()}",
        "-Wno-ignored-attributes",
        "-Wno-unused-function",
    ]
    if attachment.close_reasons:
        flags += ["-DCLOSE_REASONS", f"-DNREASONS={NREASONS}",
                  f"-DNERRNO_SLOTS={NERRNO_SLOTS}", f"-DREASON_OTHER={REASON_CODE['other']}"]
    if attachment.kind == RAW_TRACEPOINT:
        flags.append("-DRAW_TRACEPOINT")
        have = parse_release(release or kernel_release())
        if have is not None and have < RAW_TRACEPOINT_GUARDED_SINCE:
            flags.append("-DREENTRANT")
    flags += [f"-D{name}={value}" for name, value in sorted(attachment.offsets.items())]
    return flags


def parse_service_ports(text: str) -> tuple[int, ...]:
    """`80,443` -> (80, 443); UsageError on anything else."""
    ports: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise UsageError(f"--service-ports: {item!r} is not a port number 1-65535")
        if int(item) not in ports:
            ports.append(int(item))
    if len(ports) > MAX_SERVICE_PORTS:
        raise UsageError(f"--service-ports: at most {MAX_SERVICE_PORTS} ports")
    return tuple(ports)


def table_rows(socket_table_size: int) -> int:
    if not MIN_SOCKET_TABLE_SIZE <= socket_table_size <= MAX_SOCKET_TABLE_SIZE:
        raise UsageError(
            f"--socket-table-size must be between {MIN_SOCKET_TABLE_SIZE} "
            f"and {MAX_SOCKET_TABLE_SIZE}"
        )
    return -(-socket_table_size // TABLE_WAYS)
