#!/usr/bin/env bash
# One kernel's part of `make test-kernels`: runs inside each VM (and on the
# host for the host's own kernel). `tcpstate serve --dry-run`, then the
# tests of SELECTION, with CI=true so that a kernel test that cannot run
# fails instead of skipping. Everything goes to files in RESULTS, which
# tests/vm/matrix.py reads: a console may interleave, files do not.
#   usage: guest.sh RESULTS [TIME_SCALE]
set -uo pipefail

results=$1
scale=${2:-1}
checkout=$(cd "$(dirname "$0")/../.." && pwd)

# exact counts: client closes first, refused, reset, each over IPv4 and IPv6;
# trace: a port filter; --run-as: serving on after the drop, as the unit does;
# close reasons: the rows that need no timeout (all of them: 10.5 min in a VM)
SELECTION=(
  "tests/kernel/test_serve.py::test_every_transition_counted_exactly_on_both_paths[client_closes_first-ipv4]"
  "tests/kernel/test_serve.py::test_every_transition_counted_exactly_on_both_paths[client_closes_first-ipv6]"
  "tests/kernel/test_serve.py::test_every_transition_counted_exactly_on_both_paths[refused-ipv4]"
  "tests/kernel/test_serve.py::test_every_transition_counted_exactly_on_both_paths[refused-ipv6]"
  "tests/kernel/test_serve.py::test_every_transition_counted_exactly_on_both_paths[reset-ipv4]"
  "tests/kernel/test_serve.py::test_every_transition_counted_exactly_on_both_paths[reset-ipv6]"
  "tests/kernel/test_trace.py::test_port_filter_either_end_and_or_of_repeats"
  "tests/kernel/test_least_privilege.py::test_serve_with_the_unit_capabilities_and_run_as_drops_everything_and_keeps_serving"
  "tests/kernel/test_close_reasons.py::test_normal"
  "tests/kernel/test_close_reasons.py::test_refused"
  "tests/kernel/test_close_reasons.py::test_unreachable"
  "tests/kernel/test_close_reasons.py::test_resets"
  "tests/kernel/test_close_reasons.py::test_cancelled"
  "tests/kernel/test_close_reasons.py::test_no_local_port"
)

stamp() { echo "$1 $(date +%s.%N)" >>"$results/stages"; }

cd "$checkout" || exit 1
stamp start
uname -r >"$results/release"
[ -d /sys/kernel/tracing/events ] || mount -t tracefs tracefs /sys/kernel/tracing
# the checkout is read-only in a VM: no bytecode, no pytest cache
export CI=true PYTHONDONTWRITEBYTECODE=1 TCPSTATE_TEST_TIME_SCALE=$scale

.venv/bin/tcpstate serve --dry-run >"$results/dry-run.txt" 2>&1
echo $? >"$results/dry-run.rc"
stamp dry-run

.venv/bin/python -m pytest -p no:cacheprovider -ra --junitxml="$results/junit.xml" \
  "${SELECTION[@]}" >"$results/pytest.txt" 2>&1
echo $? >"$results/pytest.rc"
stamp pytest
touch "$results/done"
