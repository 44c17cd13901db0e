"""pyproxymap: a lookup-table proxy that Postfix talks to as it talks to proxymap(8)."""

__version__ = "0.1.0"
