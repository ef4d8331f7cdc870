"""``socratune chat``: a terminal conversation with a run (serving/chat.py)."""

from __future__ import annotations

import argparse
import sys

from .common import add_generation_flags, gen_params

NAME = "chat"
SUMMARY = "talk to a run in the terminal (streaming, multi-turn)"
DESCRIPTION = (
    "Type a message and Enter. /reset starts over, /system TEXT sets a system prompt,\n"
    "/save FILE appends the conversation to FILE as training data, /quit ends."
)
EXAMPLE = "socratune chat runs/tiny"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (what `socratune train --output` wrote)")
    parser.add_argument("--max-context", type=int,
                        help="tokens of conversation kept for the model (default and ceiling: the model's context)")
    add_generation_flags(parser)


def run(args: argparse.Namespace) -> int:
    from ..model.modeling import load_for_inference
    from ..serving.chat import ChatSession, run_chat

    params = gen_params(args)
    model, tokenizer = load_for_inference(args.run_dir, args.checkpoint, base_only=args.base)
    session = ChatSession(model, tokenizer, params, args.max_context)
    what = "the untuned base" if args.base else (f"checkpoint {args.checkpoint}" if args.checkpoint else "the adapter")
    print(f"Chatting with {what} of {args.run_dir} on {model.device}; context {session.max_context} tokens.")
    run_chat(session, sys.stdin, sys.stdout)
    return 0
