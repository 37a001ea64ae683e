"""Settings shared by the unit and kernel suites."""

from hypothesis import settings

# Fails the run when a test leaves a process, namespace, mount or BPF
# program of its own behind (tests/hygiene.py).
pytest_plugins = ("tests.hygiene",)

# Timing belongs in bench/, not in tests: a loaded CI machine must not turn
# a slow example into a failure.
settings.register_profile("tcpstate", deadline=None)
settings.load_profile("tcpstate")
