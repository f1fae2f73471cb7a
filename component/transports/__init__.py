"""Alias transports to other IM networks and their probing (DESIGN 3.3, 9): not built yet."""
