"""The server core: service (no sockets), table cache, sessions, listeners."""
