"""Serving: the FastGen-style engine and the OpenAI-compatible HTTP server."""
