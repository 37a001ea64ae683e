"""Settings shared by the unit and kernel suites."""

from hypothesis import settings

# Timing belongs in bench/, not in tests: a loaded CI machine must not turn
# a slow example into a failure.
settings.register_profile("tcpstate", deadline=None)
settings.load_profile("tcpstate")
