"""Postfix configuration as the proxymap daemon sees it.

``maincf`` reads main.cf and expands ``$name`` references with Postfix's own
rules, ``defaults`` holds the built-in values Postfix falls back to, and
``allowlist`` turns proxy_read_maps / proxy_write_maps into the set of tables
the server may open.
"""
