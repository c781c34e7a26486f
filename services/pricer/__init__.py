"""The pricer: ``billing.usage.v1`` → ``billing.costs.v1`` (faust-streaming agent)."""
