"""Grafana dashboards as code: each *.dashboard.py defines `dashboard`; `python -m dashboards`
writes the committed *.json beside it."""
