"""Interleaved A/B of an older bpf/tcpstate.bpf.c against the current one
(both serve builds, the ten service ports labelled), on both workloads:

    git show 04ba0ee:bpf/tcpstate.bpf.c > /tmp/old.bpf.c
    .venv/bin/python -m bench.compare_program /tmp/old.bpf.c OLD_WAYS [--new-first]

OLD_WAYS: the older file's own TABLE_WAYS (it defined it; ours passes it as
a cflag). Both programs are loaded in this process and attached in turn,
each between two untraced runs; prints the rate ratio, the workload's CPU
ratio and the program's ns per event (bpf_stats_enabled=1), medians of the
rounds. Root only. Not part of `make bench`: BENCHMARKS.md quotes it once.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import statistics

from tracer.metrics import BUCKET_MIN_LOG2, NBUCKETS
from tracer.probe import DEFAULT_SOCKET_TABLE_SIZE, FUNCTION, Probe
from tracer.states import NSTATES

from . import measure
from .lab import DENSE, REQUEST_RESPONSE, SERVICE_PORTS, Lab

TRACEPOINT = b"sock:inet_sock_set_state"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old_source")
    parser.add_argument("old_ways", type=int)
    parser.add_argument("--new-first", action="store_true")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=1.5)
    args = parser.parse_args()
    from bcc import BPF

    function = FUNCTION.encode()
    old = BPF(src_file=args.old_source.encode(), cflags=[
        f"-DNSTATES={NSTATES}", f"-DNBUCKETS={NBUCKETS}", f"-DBUCKET_MIN_LOG2={BUCKET_MIN_LOG2}",
        f"-DNPORT_SLOTS={1 + len(SERVICE_PORTS)}",
        f"-DTABLE_BUCKETS={DEFAULT_SOCKET_TABLE_SIZE // args.old_ways}",
        "-Wno-ignored-attributes", "-Wno-unused-function"])
    ports = old["service_port_slot"]
    for slot, port in enumerate(SERVICE_PORTS, start=1):
        ports[ct.c_int(port)] = ct.c_uint8(slot)
    new = Probe(service_ports=SERVICE_PORTS, seed_live_sockets=False)
    programs = [("old", old), ("new", new.bpf)]
    if args.new_first:
        programs.reverse()
    for _, bpf in programs:
        bpf.detach_tracepoint(TRACEPOINT)
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}

    def per_connection(churn: dict) -> float:
        return churn["cpu_seconds"] / churn["connections"]

    with measure.bpf_stats_enabled(), Lab() as lab:
        for _ in range(args.rounds):
            for workload in (REQUEST_RESPONSE, DENSE):
                before = lab.churn(args.seconds, workload=workload)
                for name, bpf in programs:
                    bpf.attach_tracepoint(tp=TRACEPOINT, fn_name=function)
                    fd = bpf.funcs[function].fd
                    start = measure.prog_stats_of_fd(fd)
                    traced = lab.churn(args.seconds, workload=workload)
                    end = measure.prog_stats_of_fd(fd)
                    bpf.detach_tracepoint(TRACEPOINT)
                    after = lab.churn(args.seconds, workload=workload)
                    row = rows.setdefault((workload.name, name), {"rate": [], "cpu": [], "ns": []})
                    row["rate"].append(traced["rate"] / ((before["rate"] + after["rate"]) / 2))
                    row["cpu"].append((per_connection(before) + per_connection(after)) / 2
                                      / per_connection(traced))
                    row["ns"].append((end["run_time_ns"] - start["run_time_ns"])
                                     / max(1, end["run_cnt"] - start["run_cnt"]))
                    before = after
    new.close()
    old.cleanup()
    for (workload, name), row in rows.items():
        print(f"{workload:17s} {name}: rate ratio {statistics.median(row['rate']):.3f}, "
              f"CPU ratio {statistics.median(row['cpu']):.3f}, "
              f"{statistics.median(row['ns']):.0f} ns/event; "
              f"rounds {', '.join(f'{r:.2f}' for r in row['rate'])}")


if __name__ == "__main__":
    main()
