"""Typed clients of the Genstruct service, the bulk runner and the `genstruct` command."""
