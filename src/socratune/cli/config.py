"""``socratune config``: the resolved config printed as YAML, each key explained."""

from __future__ import annotations

import argparse

from .common import add_config_flags, config_from_args

NAME = "config"
SUMMARY = "print the resolved config as YAML, each key explained"
DESCRIPTION = (
    "The preset, --config file and --set assignments resolved into one YAML file, with each\n"
    "key's meaning as a comment; save it, edit it, and train with --config."
)
EXAMPLE = "socratune config --preset gemma2-2b-jpn-qlora --set train.epochs=5 > my.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser)
    parser.set_defaults(data=None)


def run(args: argparse.Namespace) -> int:
    from ..core.config import commented_yaml

    print(commented_yaml(config_from_args(args)), end="")
    return 0
