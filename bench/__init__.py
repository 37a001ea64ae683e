"""The benchmark of tcpstate against its peers: `make bench` (bench/run.py).

Everything runs on this host, as root, in a network namespace the harness
creates; the workload is bench/churn.c, built by the harness.
"""
