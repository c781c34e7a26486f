"""The local stack: what ``billing up`` runs on one machine.

The embedded Kafka-protocol broker (Tansu) and PostgreSQL (pgserver) launchers, the
supervisor that starts and restarts the services, the fake LLM upstream for tests and
benchmarks, and the demos. Not used by the services themselves in production.
"""
