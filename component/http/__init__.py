"""Metrics and health endpoints (DESIGN 9): ``status`` serves ``/health`` and ``/metrics``."""
