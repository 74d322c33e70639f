"""ditrt.serve: dit-serve, OpenAI's image API over engine folders (optional extra: pip install 'ditrt[serve]')."""

from .app import ApiError, ServeOptions, build_app, load_models

__all__ = ["ApiError", "ServeOptions", "build_app", "load_models"]
