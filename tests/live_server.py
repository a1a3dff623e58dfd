"""A live OpenAI-compatible server on 127.0.0.1 for the tests (shared by the server, tools, constraint and web page
tests): started in a thread on a free port, stopped and joined."""

from __future__ import annotations

import threading

from mlx_gemma_mtp.server import make_server


def serve(server) -> threading.Thread:
    """`server.serve_forever()` in a daemon thread."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def start(bundle, **kwargs):
    """(server, thread): a server over `bundle` (make_server's keywords) on a free port, serving."""
    server = make_server(bundle, "127.0.0.1", 0, **kwargs)
    return server, serve(server)


def stop(server, thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def client(server):
    """The official client for `server` (no retries: a failure shows)."""
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x", max_retries=0,
                         timeout=60)


def serving(bundle, **kwargs):
    """A module fixture's body: yields (server, bundle) while the server runs."""
    server, thread = start(bundle, **kwargs)
    yield server, bundle
    stop(server, thread)


def client_of(served):
    """A module fixture's body: yields the official client of `served`'s server."""
    with client(served[0]) as c:
        yield c
