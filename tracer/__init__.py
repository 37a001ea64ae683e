"""tcpstate: the TCP connection life-cycle of a Linux host, from the
tracepoint sock:inet_sock_set_state, as Prometheus metrics and a live view."""

__version__ = "0.1.0"
