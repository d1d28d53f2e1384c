"""The global model on the server's disk: partial exchange, guarded saves, resume."""
