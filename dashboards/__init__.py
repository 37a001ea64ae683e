"""Grafana dashboards and Prometheus rules for tcpstate, kept as code.

generate.py builds the dashboards (with grafana-foundation-sdk) and the rule
file from tracer/metrics.py and tracer/states.py and writes them here;
render.py draws a dashboard's panels from a Prometheus into PNG files.
"""
