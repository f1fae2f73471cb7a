"""Chat messages both ways, the retry queue, notices and registrar commands (DESIGN 4)."""
