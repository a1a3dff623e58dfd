"""The OpenAI-compatible HTTP server (`mlx-gemma-mtp serve`): `protocol` parses requests and shapes responses,
`http` serves them over the standard library's threading HTTP server."""

from .http import Server, make_server

__all__ = ["Server", "make_server"]
