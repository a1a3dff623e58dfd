"""`mlx-gemma-mtp serve`: the OpenAI-compatible server (`mlx_gemma_mtp.server`) from the command line; under
`mlx.launch` rank 0 serves and the other ranks follow its generations."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from ..distributed.group import distributed_group
from ..prompt_cache import PromptCaches
from ..server.http import follow, make_server
from ..server.protocol import ServerState
from .options import add_model_arguments, draft_tokens, load_model, model_name


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve",
                       help="an OpenAI-compatible HTTP server (chat/completions, completions, models)")
    add_model_arguments(p)
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients see (default: the checkpoint folder's name, or the hub id)")
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--num-draft-tokens", type=draft_tokens, default=None,
                   help="draft length K, 0 for plain decoding, or 'auto' (default when a drafter is loaded)")
    p.add_argument("--max-tokens", type=int, default=512, help="for requests that give no max_tokens")
    p.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                   help="browser origins whose pages may call the API (CORS), e.g. http://example.com:3000, or "
                        "'*' for any; pages served from localhost always may")
    p.add_argument("--prompt-cache-size", type=int, default=4,
                   help="conversations whose K/V are kept between requests (least recently used dropped first)")
    p.add_argument("--prompt-cache-bytes", type=int, default=None,
                   help="the most bytes those caches may hold together (default: no limit but their number)")
    p.add_argument("--max-concurrency", type=int, default=4,
                   help="requests decoded together, each exactly as alone (continuous batching with MTP per "
                        "request); 1: one at a time (default 4; a sharded server always takes one at a time)")
    p.add_argument("--allow-local-media", action="store_true",
                   help="let image/video/audio parts name files on this machine (default: data: URLs only; nothing is "
                        "ever fetched from the network)")
    p.set_defaults(func=run_serve)


def run_serve(args) -> None:
    caches = PromptCaches(args.prompt_cache_size, args.prompt_cache_bytes)  # checks them before the load
    group = distributed_group()  # under mlx.launch: rank 0 serves, the others follow its generations
    bundle = load_model(args, group)
    name = model_name(args)
    concurrency = 1 if group is not None else args.max_concurrency
    if group is not None and group.rank() != 0:
        follow(ServerState(bundle, name, args.num_draft_tokens, args.max_tokens, group=group, prompt_caches=caches))
    aliases = tuple(a for a in {args.model, str(bundle.path)} if a and a != name)
    server = make_server(bundle, args.host, args.port, name, args.num_draft_tokens, args.max_tokens, aliases,
                         tuple(args.allowed_origins), caches, args.allow_local_media, concurrency)
    server.RequestHandlerClass.state.group = group
    host, port = server.server_address[:2]
    together = f", {concurrency} requests at once" if concurrency > 1 else ""
    print(f"serving {name} on http://{host}:{port}/v1{together} (Ctrl-C stops)", file=sys.stderr)
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # a service's stop: as Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        server.server_close()  # running generations end within a round; their threads are joined
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    print("stopped", file=sys.stderr)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mlx-gemma-mtp serve")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    args.func(args)


if __name__ == "__main__":
    main()
