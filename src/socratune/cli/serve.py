"""``socratune serve``: the OpenAI-compatible API and chat page (serving/)."""

from __future__ import annotations

import argparse
import os
import sys

from ..core.errors import ConfigError
from .common import add_generation_flags, gen_params

NAME = "serve"
SUMMARY = "OpenAI-compatible API and a chat page in the browser"
DESCRIPTION = "The generation flags are the defaults for requests that do not name their own."
EXAMPLE = "socratune serve runs/tiny --port 8000"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (what `socratune train --output` wrote)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="0 = any free port")
    parser.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1 (default: the "
                        "SOCRATUNE_API_KEY environment variable, which keeps the key out of the process list)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="allow --host beyond loopback without an API key (anyone who can reach it can use it)")
    parser.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                        help="let pages from ORIGIN (e.g. https://example.com) call the API; repeatable; none by "
                             "default")
    parser.add_argument("--max-batch", type=int, metavar="N",
                        help="replies decoded together; as many more requests may wait, the rest get 429 "
                        "(default: 8 on CPU, 32 on a GPU)")
    add_generation_flags(parser)  # the defaults for requests that do not name their own


def run(args: argparse.Namespace) -> int:
    from ..model.modeling import load_for_inference
    from ..serving.app import is_loopback
    from ..serving.engine import Engine, model_id_for
    from ..serving.server import API_KEY_ENV, ChatServer

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host):
        if not api_key and not args.insecure_no_auth:
            raise ConfigError(f"serving on {args.host} would let anyone who can reach port {args.port} use the model: "
                              f"set an API key ({API_KEY_ENV}=... or --api-key), or pass --insecure-no-auth")
        if not api_key:
            print(f"warning: serving on {args.host} with --insecure-no-auth: anyone who can reach this machine on "
                  f"port {args.port} can use the model; there is no authentication", file=sys.stderr)
    params = gen_params(args)  # the defaults for requests that name no temperature, max_tokens...
    if args.max_batch is not None and args.max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, got {args.max_batch}", "--max-batch")
    # binds now: a busy port fails before the model loads
    server = ChatServer(args.host, args.port, api_key=api_key, cors_origins=tuple(args.cors_origin or ()))
    try:
        model, tokenizer = load_for_inference(args.run_dir, args.checkpoint, base_only=args.base)
        engine = Engine(model, tokenizer, model_id_for(args.run_dir, args.checkpoint, args.base), params,
                        max_batch=args.max_batch)
        print(f"Serving {engine.model_id}: chat page {server.url}/ , OpenAI API {server.url}/v1 (Ctrl+C stops)",
              flush=True)
        server.serve(engine)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
