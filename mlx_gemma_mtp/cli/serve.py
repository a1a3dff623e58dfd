"""`mlx-gemma-mtp serve`: the OpenAI-compatible server (`mlx_gemma_mtp.server`) from the command line; under
`mlx.launch` rank 0 serves and the other ranks follow its generations."""

from __future__ import annotations

import argparse
import sys

from ..distributed.group import distributed_group
from ..server.http import follow, make_server
from ..server.protocol import ServerState
from .options import draft_tokens


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve",
                       help="an OpenAI-compatible HTTP server (chat/completions, completions, models)")
    p.add_argument("--model", required=True, help="local folder or hub id of a Gemma 4 checkpoint or bundle")
    p.add_argument("--draft", default=None, help="folder or hub id of the matching gemma4_assistant drafter")
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--num-draft-tokens", type=draft_tokens, default=None,
                   help="draft length K, 0 for plain decoding, or 'auto' (default when a drafter is loaded)")
    p.add_argument("--max-tokens", type=int, default=512, help="for requests that give no max_tokens")
    p.set_defaults(func=run_serve)


def run_serve(args) -> None:
    from .. import load

    group = distributed_group()  # under mlx.launch: rank 0 serves, the others follow its generations
    if group is None:
        bundle = load(args.model, draft=args.draft)
    else:
        from ..distributed.load import load_sharded

        bundle = load_sharded(args.model, args.draft, group)
        if group.rank() != 0:
            follow(ServerState(bundle, args.model, args.num_draft_tokens, args.max_tokens, group=group))
    server = make_server(bundle, args.host, args.port, args.model, args.num_draft_tokens, args.max_tokens)
    server.RequestHandlerClass.state.group = group
    host, port = server.server_address[:2]
    print(f"serving {args.model} on http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mlx-gemma-mtp serve")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    args.func(args)


if __name__ == "__main__":
    main()
