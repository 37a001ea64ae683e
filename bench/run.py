"""`make bench`: measure tcpstate against its peers and write the results.

    .venv/bin/python -m bench.run [--quick] [--only FIGURE,...] [--out DIR]

Root only. Writes DIR/results.json, DIR/results.md (the tables of
BENCHMARKS.md) and DIR/*.svg (its plots); DIR defaults to bench/results.
Exits 1 when a correctness check failed, 0 otherwise: the timing targets
are reported, not enforced (the machine may be busy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from . import ages, figures, memory, report
from .measure import load_average
from .lab import Lab

FIGURES = {
    "kernel_cost": figures.kernel_cost,
    "reasons": figures.close_reasons_cost,
    "rates": figures.rate_ratios,
    "serve_cpu": figures.serve_cpu,
    "scrape_latency": figures.scrape_latency,
    "gauge": figures.gauge_scaling,
    "first_count": figures.first_count,
    "exact": figures.exact_count,
    "stop": figures.stop_time,
    "hostile": figures.hostile_neighbour,
    "skips": figures.skips_under_scrapes,
    "memory": memory.memory_and_start,
    "socket_ages": ages.socket_ages,
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    with open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                      if line.startswith("model name")), platform.machine())
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": platform.release(),
            "os": platform.freedesktop_os_release().get("PRETTY_NAME", "")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    parser.add_argument("--only", default=",".join(FIGURES),
                        help=f"figures to run, comma-separated (default all: {','.join(FIGURES)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in FIGURES]
    if unknown:
        parser.error(f"unknown figure {unknown[0]!r}; choose from {', '.join(FIGURES)}")
    if os.geteuid() != 0:
        sys.stderr.write("bench: must run as root (it loads BPF programs, makes namespaces)\n")
        return 3
    settings = figures.Settings.quick() if args.quick else figures.Settings()
    command = "make bench-quick" if args.quick else "make bench"
    results = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": machine(),
               "settings": {k: v for k, v in vars(settings).items() if k != "rate_configs"},
               "load_average_before": load_average(), "figures": {}}
    started = time.monotonic()
    with Lab() as lab:
        for name in chosen:
            began = time.monotonic()
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            results["figures"][name] = FIGURES[name](lab, settings)
            print(f"bench: {name} done in {time.monotonic() - began:.0f}s "
                  f"(load average {load_average()})", file=sys.stderr, flush=True)
    results["seconds"] = time.monotonic() - started
    results["load_average_after"] = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    markdown, failures = report.render(results, args.out)
    (args.out / "results.md").write_text(markdown)
    print(markdown)
    for failure in failures:
        print(f"bench: CHECK FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
