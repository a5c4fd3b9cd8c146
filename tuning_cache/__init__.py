"""Shipped tuned kernel configs (JSON), installed as package data ``fp8conv.tuning_cache``."""
