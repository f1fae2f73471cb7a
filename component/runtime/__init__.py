"""The asyncio drivers: owned tasks, the serialised core driver, sweeps."""
