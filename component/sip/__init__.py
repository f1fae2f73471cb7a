"""The SIP adapter: requests in as values, answers and requests out (DESIGN 2, 7)."""
