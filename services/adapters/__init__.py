"""Adapters: the I/O edge under the services and jobs.

Kafka (producer, consumer, topics, the event publisher), PostgreSQL (connections,
migrations, the read-model tables, their monthly partitions and stored consumer offsets),
the price books (file and PostgreSQL), the OpenRouter catalogue client and its cache, the
tenant key store, metrics, settings and paths. Imports ``services.core`` and libraries
only: never a service, a job, the local stack or the CLI.
"""
