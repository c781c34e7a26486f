"""The HTTP gateway: the quote API now; the LLM proxy, usage ingest and queries later."""
