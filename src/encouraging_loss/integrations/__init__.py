"""Integrations with training frameworks (imported on demand: no extra dependency here)."""
