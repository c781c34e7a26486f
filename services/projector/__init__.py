"""The projector: ``billing.costs.v1`` → PostgreSQL read models, exactly once by request."""
