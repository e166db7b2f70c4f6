"""The OpenAI-compatible HTTP API: `create_app` (FastAPI) and `serve` (uvicorn + model loading).

Importing this package pulls in FastAPI; the CLI imports it only for `visualchat serve`.
"""

from serving.openai_api.app import create_app, set_backend
from serving.openai_api.server import APIServer, serve

__all__ = ["APIServer", "create_app", "serve", "set_backend"]
