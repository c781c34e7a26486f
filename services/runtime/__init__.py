"""Process wiring shared by the services: settings, adapters (price-book file, OpenRouter
catalogue client, pricing cache) and the ``billing`` command line."""
