"""Fixtures for tests and for trying things offline: tiny stand-ins of the public PRM families (`standins`)
and a tiny generator fitted on reference solutions (`tiny`).

The library never imports this package (tests/test_architecture.py checks it); a user imports it to try a hub
PRM family without downloading it (`save_standin(family, folder)`).
"""
