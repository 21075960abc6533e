"""An OpenAI-compatible HTTP server over the inference engine (`dsv3 serve`)."""

from .api import create_app

__all__ = ["create_app"]
