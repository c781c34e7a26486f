"""Jobs: application work run on demand rather than as a long-lived service.

``reprice`` (re-rate a window after a price correction), ``rebuild`` (re-derive the read
models from the cost topic) and ``reconcile`` (our totals against a provider's invoice).
Built on ``services.core`` and ``services.adapters`` (the read-model shape and stored
offsets the projector uses too);
no click: the CLI in ``services.cli`` wraps them.
"""
