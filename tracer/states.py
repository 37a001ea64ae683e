"""The TCP state table: the one home of state names and numberings.

Kernel codes are those of include/net/tcp_states.h, which the tracepoint
sock:inet_sock_set_state reports; names are what tcpstate prints and labels
with; RFC 793 names and TCP-MIB tcpConnState codes let dashboards show either.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class State:
    name: str
    kernel_code: int
    rfc793_name: str
    mib_code: int | None  # None: the kernel state has no TCP-MIB code


STATES: tuple[State, ...] = (
    State("close", 7, "CLOSED", 1),
    State("listen", 10, "LISTEN", 2),
    State("syn_sent", 2, "SYN-SENT", 3),
    State("syn_recv", 3, "SYN-RECEIVED", 4),
    State("established", 1, "ESTABLISHED", 5),
    State("fin_wait1", 4, "FIN-WAIT-1", 6),
    State("fin_wait2", 5, "FIN-WAIT-2", 7),
    State("close_wait", 8, "CLOSE-WAIT", 8),
    State("last_ack", 9, "LAST-ACK", 9),
    State("closing", 11, "CLOSING", 10),
    State("time_wait", 6, "TIME-WAIT", 11),
    State("new_syn_recv", 12, "(request sock)", None),
)

# Kernel codes run 1..12; index 0 is not a state. The BPF maps are indexed
# by kernel code, so they need this many rows.
NSTATES = 13

BY_NAME: dict[str, State] = {s.name: s for s in STATES}
BY_CODE: dict[int, State] = {s.kernel_code: s for s in STATES}


def name_of(kernel_code: int) -> str:
    """Label value for a kernel state code; unknown codes stay visible."""
    state = BY_CODE.get(kernel_code)
    return state.name if state else f"unknown_{kernel_code}"


def code_of(name: str) -> int:
    """Kernel code of a state name; ValueError lists the valid names."""
    try:
        return BY_NAME[name].kernel_code
    except KeyError:
        raise ValueError(
            f"unknown state {name!r}; valid states: {', '.join(BY_NAME)}"
        ) from None


# Every transition the kernel makes on a full TCP socket, as the tracepoint
# reports it (net/ipv4/tcp.c, tcp_input.c, tcp_minisocks.c, inet_connection_sock.c).
# Exported from start at 0 so that rates and alerts work before the first event.
KNOWN_TRANSITIONS: tuple[tuple[str, str], ...] = (
    ("close", "listen"),            # listen()
    ("listen", "close"),            # close() of a listener
    ("close", "syn_sent"),          # connect()
    ("syn_sent", "established"),    # handshake completed
    ("syn_sent", "close"),          # refused, timed out, or closed while connecting
    ("syn_sent", "syn_recv"),       # simultaneous open
    ("listen", "syn_recv"),         # a child socket is created from the listener
    ("syn_recv", "established"),    # child completes (microseconds after its birth)
    ("syn_recv", "fin_wait1"),      # closed before it was established
    ("syn_recv", "close"),          # reset during the handshake
    ("established", "fin_wait1"),   # we close first
    ("established", "close_wait"),  # the peer closes first
    ("established", "close"),       # reset (received or sent)
    ("fin_wait1", "fin_wait2"),     # our FIN acknowledged
    ("fin_wait1", "closing"),       # simultaneous close
    ("fin_wait1", "close"),         # reset, or handed to a TIME-WAIT mini-socket
    ("fin_wait2", "close"),         # handed to a TIME-WAIT mini-socket, or reset
    ("closing", "close"),           # handed to a TIME-WAIT mini-socket
    ("close_wait", "last_ack"),     # we close after the peer
    ("close_wait", "close"),        # reset, or abortive close
    ("last_ack", "close"),          # our FIN acknowledged: the socket is gone
)

# Transitions that give a socket to its TIME-WAIT mini-socket (or reset it:
# the tracepoint does not tell the two apart; see README).
TIME_WAIT_HANDOFFS: tuple[tuple[str, str], ...] = (
    ("fin_wait1", "close"),
    ("fin_wait2", "close"),
    ("closing", "close"),
)

# States the live-socket gauge reports. CLOSE is not a live socket and the
# kernel traces no transition of request sockets (new_syn_recv).
GAUGE_STATES: tuple[str, ...] = (
    "listen", "syn_sent", "syn_recv", "established", "fin_wait1", "fin_wait2",
    "close_wait", "last_ack", "closing", "time_wait",
)

# States a full socket holds in the socket table, whose age in state is
# exported: the live-socket gauge's but TIME-WAIT (a mini-socket the
# program never sees enter it).
TABLE_STATES: tuple[str, ...] = tuple(s for s in GAUGE_STATES if s != "time_wait")

FAMILIES: tuple[str, ...] = ("ipv4", "ipv6")  # index = the BPF family index
SIDES: tuple[str, ...] = ("", "client", "server")  # index = the BPF side code
