"""`make test-kernels`: tcpstate on the kernels users run.

Boots each kernel that deploy/fetch-kernels.sh unpacked into the cache in a
virtme-ng VM over the host's own file system (read-only; this checkout and
its venv included), emulated by QEMU's TCG (the nested CPU here lacks what
KVM needs), and runs tests/vm/guest.sh inside it; then runs the same
script on the host for the host's kernel. Results are read from the files
the script writes, never from a console. A VM that outlives --timeout is
killed and reported as a failure. One line per kernel at the end.

    python -m tests.vm.matrix [--only SUBSTRING] [--no-host] [--jobs N] [--timeout S]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.kernel.netlab import TIME_SCALE

CHECKOUT = Path(__file__).resolve().parents[2]
GUEST_SCRIPT = CHECKOUT / "tests" / "vm" / "guest.sh"
DEFAULT_CACHE = "/var/cache/tcpstate/kernels"
# `serve --dry-run`: "loaded and attached to the raw tracepoint NAME" (or
# "the tracepoint CATEGORY:NAME" on the classic path)
ATTACH_PATH = re.compile(r"attached to the (raw tracepoint|tracepoint) ")
# and the features its probes found: "kernel features: raw_tracepoint cmpxchg ..."
FEATURES = re.compile(r"kernel features: ([a-z0-9_ ]+)")


@dataclass
class Kernel:
    name: str                # what the summary calls it
    image: Path | None       # None: the host's own kernel, run natively


@dataclass
class Outcome:
    kernel: Kernel
    release: str = "?"
    passed: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    attach: str = "unknown"
    features: str = "unknown"
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # seconds of each guest stage
    problem: str = ""        # why the run itself failed, if it did

    def line(self) -> str:
        where = "vm" if self.kernel.image else "host"
        text = (f"{self.release} ({where}): {self.passed} passed, {self.failed} failed, "
                f"attach: {self.attach}, features: {self.features}, {self.seconds:.0f} s")
        if self.stages:
            # the rest of the time: booting and powering off
            rest = max(0.0, self.seconds - sum(self.stages.values()))
            shares = [f"{name} {seconds:.0f}" for name, seconds in self.stages.items()]
            text += f" ({', '.join(shares)}, rest {rest:.0f})"
        if self.problem:
            text += f"; {self.problem}"
        if self.failures:
            text += f"; failed: {', '.join(self.failures)}"
        return text


def cached_kernels(cache: Path) -> list[Kernel]:
    """The releases the fetch script finished unpacking, oldest first."""
    def version(path: Path) -> list[int]:
        return [int(part) for part in re.findall(r"\d+", path.name)]

    kernels = []
    for home in sorted((p for p in cache.glob("*") if (p / "complete").exists()), key=version):
        kernels.append(Kernel(home.name, home / "root" / "boot" / f"vmlinuz-{home.name}"))
    return kernels


def vm_command(kernel: Kernel, cache: Path, results: Path, args) -> list[str]:
    return [
        str(Path(sys.executable).with_name("vng")), "--run", str(kernel.image),
        "--disable-kvm",
        "--verbose",  # the kernel's messages in console.log, for a VM that hangs
        # 9p: Debian 12's qemu has no virtiofsd that virtme-ng can drive
        "--force-9p",
        "--cpus", str(args.cpus), "--memory", args.memory,
        # the cache may sit under a directory the guest covers with a tmpfs
        "--rodir", str(cache),
        "--rwdir", str(results),
        "--exec", f"{GUEST_SCRIPT} {results} {args.scale}",
    ]


def run_with_timeout(command: list[str], log: Path, timeout: float, env: dict) -> str:
    """Runs `command` in a session of its own; kills the whole session after
    `timeout` seconds. Returns '' or what went wrong."""
    with open(log, "wb") as console:
        process = subprocess.Popen(command, cwd=CHECKOUT, env=env, stdin=subprocess.DEVNULL,
                                   stdout=console, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return f"killed after {timeout:.0f} s (timeout)"
    return "" if returncode == 0 else f"exited {returncode} (console: {log})"


def read_results(outcome: Outcome, results: Path) -> None:
    """Counts from the files guest.sh wrote; the dry run counts as one check."""
    def text(name: str) -> str:
        try:
            return (results / name).read_text().strip()
        except OSError:
            return ""

    outcome.release = text("release") or outcome.kernel.name
    # "stage unix-time" lines: each stage lasted from the line before it
    stamps = [line.split() for line in text("stages").splitlines()
              if re.fullmatch(r"\S+ \d+(\.\d+)?", line)]  # not a line cut short by a kill
    for (_, begun), (stage, ended) in zip(stamps, stamps[1:]):
        outcome.stages[stage] = float(ended) - float(begun)
    dry_run = text("dry-run.txt")
    if text("dry-run.rc") == "0":
        outcome.passed += 1
    elif text("dry-run.rc"):
        outcome.failed += 1
        outcome.failures.append(f"serve --dry-run exited {text('dry-run.rc')}")
    found = ATTACH_PATH.search(dry_run)
    if found:
        outcome.attach = found[1].replace(" ", "_")
    found = FEATURES.search(dry_run)
    if found:
        outcome.features = found[1].strip()
    try:
        suite = ElementTree.parse(results / "junit.xml").getroot()
    except (OSError, ElementTree.ParseError):
        if not outcome.problem:
            outcome.problem = f"no test results ({results}/pytest.txt)"
        outcome.failed += 1
        return
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            outcome.failed += 1
            outcome.failures.append(case.get("name", "?"))
        elif case.find("skipped") is not None:
            outcome.failed += 1  # CI=true: a kernel test never skips here
            outcome.failures.append(f"{case.get('name', '?')} (skipped)")
        else:
            outcome.passed += 1
    if not (results / "done").exists() and not outcome.problem:
        outcome.problem = "the guest script did not finish"


def run_one(kernel: Kernel, cache: Path, results_root: Path, args) -> Outcome:
    results = results_root / (kernel.name if kernel.image else "host")
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if kernel.image:
        command, timeout = vm_command(kernel, cache, results, args), args.timeout
    else:
        command, timeout = [str(GUEST_SCRIPT), str(results), "1"], args.timeout
        env[TIME_SCALE] = "1"
    outcome = Outcome(kernel)
    started = time.monotonic()
    outcome.problem = run_with_timeout(command, results / "console.log", timeout, env)
    outcome.seconds = time.monotonic() - started
    read_results(outcome, results)
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vm.matrix",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("TCPSTATE_KERNEL_CACHE", DEFAULT_CACHE)))
    parser.add_argument("--results", type=Path, default=CHECKOUT / "build" / "test-kernels")
    parser.add_argument("--only", default="", help="run only kernels whose release contains this")
    parser.add_argument("--no-host", action="store_true", help="skip the host's own kernel")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds per kernel (a VM took 1061 s on a busy machine)")
    parser.add_argument("--scale", type=float, default=10.0,
                        help="factor for the tests' waits inside a VM")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--jobs", type=int, default=2,
                        help="kernels run at once (an emulated VM keeps about one core busy)")
    args = parser.parse_args(argv)

    kernels = [k for k in cached_kernels(args.cache) if args.only in k.name]
    if not args.no_host and args.only in os.uname().release:
        kernels.append(Kernel(os.uname().release, None))
    if not kernels:
        print(f"test-kernels: no kernel to run (cache {args.cache}: run "
              "`deploy/setup.sh kernels`)", file=sys.stderr)
        return 2
    started = time.monotonic()

    def run_and_say(kernel: Kernel) -> Outcome:
        print(f"test-kernels: {kernel.name} ({'vm' if kernel.image else 'host'}) ...", flush=True)
        outcome = run_one(kernel, args.cache, args.results, args)
        print(f"test-kernels: {outcome.line()}", flush=True)
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        outcomes = list(pool.map(run_and_say, kernels))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"\ntest-kernels: {len(outcomes)} kernels in {time.monotonic() - started:.0f} s "
          f"({args.jobs} at once), largest process {peak:.0f} MiB; logs in {args.results}")
    for outcome in outcomes:
        print(f"  {outcome.line()}")
    passed = sum(o.passed for o in outcomes)
    failed = sum(o.failed for o in outcomes)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or any(o.problem for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
