"""The quota service: balances, budget spend and alerts from ``billing.costs.v1``."""
