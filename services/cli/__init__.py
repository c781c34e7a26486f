"""Entry points: the ``billing`` command line, one module per command group.

The top of the layers: it may import anything below; nothing imports it.
"""
