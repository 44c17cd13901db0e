"""pgsql:, mysql: and sqlite: tables, read from the same .cf files Postfix reads.

The three drivers share everything but the wire to the database:

- :mod:`.config` reads a .cf file as Postfix's cfg_parser does, and the
  parameters every SQL table has (``query`` and its legacy parts,
  ``result_format``, ``domain``, ``expansion_limit``, ``hosts``);
- :mod:`.query` expands the query and result templates as Postfix's
  db_common does, quotes as each database's client library does, applies the
  ``domain`` list and joins the answers;
- :mod:`.pool` holds the connections: bounded, shared, recycled, health
  checked, with Postfix's host failover and RETRY (never "not found") on any
  failure;
- :mod:`.table` is the lookup path common to all three;
- :mod:`.pgsql`, :mod:`.mysql` and :mod:`.sqlite` connect, quote and fetch.
"""
