"""Why a socket closed: the one home of the close reasons and of the table
that gives one to every transition into CLOSE.

The table is a function of what the program can see at the transition (the
tracepoint fires at the end of tcp_set_state(), net/ipv4/tcp.c):

  old state   the state the socket leaves
  sk_err      the error the kernel stored for the owner to read. tcp_reset(),
              tcp_write_err() and tcp_v4_err()/tcp_v6_err() write it BEFORE
              tcp_done() moves the socket to CLOSE (tcp_done_with_error());
              tcp_disconnect() (SO_LINGER 0, connect(AF_UNSPEC)) writes
              ECONNRESET only AFTER, and a close with unread data writes none:
              a local reset shows sk_err 0
  owner       whether a process holds the socket (sk->sk_lock.owned: its
              system call on the socket runs under lock_sock()). Softirq and
              timers find it 0, or defer their work to release_sock(), which
              runs with it still 1: a received RST may be processed from the
              backlog inside the owner's call, so sk_err, not the context,
              decides "by peer"
  port 0      the socket never got a local port (neither skc_num nor
              inet_sport): inet_hash_connect() found none, after
              tcp_v4_connect() had set SYN_SENT

The kernel does not evaluate this module: tracer/probe.py writes the whole
table, `close_reason_table()`, into the program's `close_reason` map before
it attaches, indexed by `evidence_key()`; the program reads one cell per
transition into CLOSE. The C knows only the table's geometry (cflags).
"""

from __future__ import annotations

import errno

from .states import KNOWN_TRANSITIONS, NSTATES, code_of

# Index = the code the program stores; tracer/metrics.py labels with the names.
REASONS: tuple[str, ...] = (
    "normal",          # a close that ends a connection as TCP means: no error
    "refused",         # RST answering our SYN, or ICMP port unreachable
    "timeout",         # retransmissions, keepalives or TCP_USER_TIMEOUT ran out
    "unreachable",     # ICMP network/host unreachable or prohibited
    "reset_by_peer",   # RST received on a synchronized connection
    "reset_local",     # this host reset or abandoned the connection
    "cancelled",       # the program closed its socket while it was connecting
    "no_local_port",   # connect() found no free local port
    "other",           # an error this table does not name
)
NREASONS = len(REASONS)
# A trace event's reason when it is not a close, or reasons are off.
NO_REASON = 0xFF
CODE: dict[str, int] = {name: index for index, name in enumerate(REASONS)}

# sk_err as the program files it: errno values 0..MAX_ERRNO, one slot above
# for anything larger (an int sk_err is never negative).
MAX_ERRNO = 134
NERRNO_SLOTS = MAX_ERRNO + 2

# errno -> reason, for a non-zero sk_err. ICMP errors arrive converted by
# icmp_err_convert[] (IPv4) and icmpv6_err_convert() (IPv6): port
# unreachable is ECONNREFUSED (so it counts as refused), IPv4's
# "administratively prohibited" is EHOSTUNREACH, IPv6's is EACCES.
ERRNO_REASONS: dict[int, str] = {
    errno.ECONNREFUSED: "refused",
    errno.ETIMEDOUT: "timeout",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
    errno.EHOSTDOWN: "unreachable",     # ICMP host unknown
    errno.ENONET: "unreachable",        # ICMP host isolated
    errno.EACCES: "unreachable",        # ICMPv6 administratively prohibited, reject route
    errno.ECONNRESET: "reset_by_peer",  # tcp_reset() in every state but two:
    errno.EPIPE: "reset_by_peer",       # ... CLOSE_WAIT (EPIPE) and SYN_SENT (refused)
    errno.ECONNABORTED: "reset_local",  # tcp_abort(): `ss -K`, SOCK_DESTROY
}

SYN_SENT = code_of("syn_sent")
LISTEN = code_of("listen")
FIN_WAIT1 = code_of("fin_wait1")
# With sk_err 0, leaving these states for CLOSE is this host's abort: a
# close with unread data or SO_LINGER 0, a listener closed with children
# not accepted, orphan limits. Every way the peer or a timer ends them
# writes sk_err first.
ABORTED_WITHOUT_ERROR = frozenset(code_of(s) for s in ("syn_recv", "established", "close_wait"))
# With sk_err 0, leaving these for CLOSE is a normal end: the hand-off to a
# TIME-WAIT mini-socket, the last ACK. A local reset there looks the same.
ENDED_WITHOUT_ERROR = frozenset(code_of(s) for s in ("fin_wait2", "closing", "last_ack"))


def classify(old: int, sk_err: int, owner: bool, port_zero: bool) -> str:
    """The reason of one transition old -> close, from the evidence."""
    if old == LISTEN:
        return "normal"  # a listener has no peer: its owner (or `ss -K`) closed it
    if sk_err:
        reason = ERRNO_REASONS.get(sk_err, "other")
        if reason == "reset_local" and old == SYN_SENT:
            return "cancelled"  # aborted while connecting: no reset is sent
        return reason
    if old == SYN_SENT:
        if port_zero:
            return "no_local_port"
        return "cancelled" if owner else "other"
    if old in ABORTED_WITHOUT_ERROR:
        return "reset_local"
    if old == FIN_WAIT1:
        # the owner's close with SO_LINGER 0 or unread data after a shutdown;
        # elsewhere a hand-off or an orphan given up: not told apart
        return "reset_local" if owner else "normal"
    if old in ENDED_WITHOUT_ERROR:
        return "normal"
    return "other"  # a state that never closes (unknown codes)


def errno_slot(sk_err: int) -> int:
    return sk_err if 0 <= sk_err <= MAX_ERRNO else MAX_ERRNO + 1


def evidence_key(old: int, sk_err: int, owner: bool, port_zero: bool) -> int:
    """The cell of `close_reason` for this evidence; the C computes the same
    (bpf/tcpstate.h, close_evidence_key)."""
    return ((old * NERRNO_SLOTS + errno_slot(sk_err)) * 2 + int(owner)) * 2 + int(port_zero)


TABLE_CELLS = NSTATES * NERRNO_SLOTS * 2 * 2


def close_reason_table() -> bytes:
    """Every cell of the `close_reason` map: the reason code per evidence."""
    table = bytearray(TABLE_CELLS)
    for old in range(NSTATES):
        for sk_err in range(NERRNO_SLOTS):
            for owner in (False, True):
                for port_zero in (False, True):
                    key = evidence_key(old, sk_err, owner, port_zero)
                    table[key] = CODE[classify(old, sk_err, owner, port_zero)]
    return bytes(table)


# The states a socket leaves for CLOSE (KNOWN_TRANSITIONS).
CLOSING_STATES: tuple[int, ...] = tuple(
    code_of(old) for old, new in KNOWN_TRANSITIONS if new == "close")


def possible_reasons() -> tuple[tuple[int, str], ...]:
    """(old state code, reason) pairs the table can give for the states
    that close: exported from start at 0, so rates and alerts work before
    the first event."""
    pairs = {(old, classify(old, sk_err, owner, port_zero))
             for old in CLOSING_STATES for sk_err in range(NERRNO_SLOTS)
             for owner in (False, True) for port_zero in (False, True)}
    return tuple(sorted(pairs, key=lambda pair: (CLOSING_STATES.index(pair[0]),
                                                 CODE[pair[1]])))


def parse_reasons(text: str) -> list[str]:
    """`refused,timeout` -> the names; ValueError naming the valid ones."""
    names = [item.strip().lower() for item in text.split(",")]
    for name in names:
        if name not in CODE:
            raise ValueError(f"unknown reason {name!r}; valid reasons: {', '.join(REASONS)}")
    return names

