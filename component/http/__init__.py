"""Metrics and health endpoints (DESIGN 9): not built yet."""
