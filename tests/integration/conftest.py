"""Integration tests share the PostgreSQL and broker fixtures of ``tests/conftest.py``."""
