"""The ``distserve`` command: parses arguments and hands off to the packages that do the work.

Each subcommand lives with the code it drives; this module only maps names to
``(add_arguments, run)`` pairs, importing the heavy modules lazily so that ``distserve --help``
and the SDK commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence

# name -> (module, add-arguments function, run function, one-line help)
_COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "serve": (
        "distserve.launch.serve",
        "add_serve_arguments",
        "run_serve",
        "run a whole cluster (router + prefill + decode) on this machine",
    ),
    "generate": (
        "distserve.client.cli",
        "add_generate_arguments",
        "run_generate",
        "send one request to a running router",
    ),
    "launch": (
        "distserve.launch.launch",
        "add_launch_arguments",
        "run_launch",
        "the per-rank entry point under torchrun",
    ),
    "router": (
        "distserve.launch.router_main",
        "add_router_arguments",
        "run_router",
        "run the router alone",
    ),
    "bench": (
        "distserve.bench.cli",
        "add_bench_arguments",
        "run_bench",
        "load generator and SLO report against a running endpoint",
    ),
    "profile": (
        "placement.cli",
        "add_profile_arguments",
        "run_profile",
        "measure this hardware's latency and bandwidth for the planner",
    ),
    "plan": (
        "placement.cli",
        "add_plan_arguments",
        "run_plan",
        "choose each phase's parallelism and pool sizes from SLOs",
    ),
}


def _add_make_tiny_model(parser: argparse.ArgumentParser) -> None:
    from distserve.model.tiny_model import ARCHITECTURES, PRESETS

    parser.add_argument("out_dir", help="folder to write the checkpoint into")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="llama")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="tiny: fast tests; small-100m: ~76M parameters for benchmarks",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--intermediate-size", type=int)
    parser.add_argument("--max-position-embeddings", type=int)
    parser.add_argument("--rope-theta", type=float)
    parser.add_argument(
        "--rope-scaling",
        type=json.loads,
        help='JSON, e.g. \'{"rope_type": "linear", "factor": 2.0}\'',
    )
    parser.add_argument("--tie-word-embeddings", action="store_true", default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--shard-size", type=int, help="bytes per safetensors shard (writes a sharded checkpoint)"
    )


def _run_make_tiny_model(args: argparse.Namespace) -> int:
    from distserve.model.tiny_model import make_tiny_model

    keys = (
        "layers",
        "hidden_size",
        "heads",
        "kv_heads",
        "intermediate_size",
        "max_position_embeddings",
        "rope_theta",
        "rope_scaling",
        "tie_word_embeddings",
        "dtype",
        "shard_size",
    )
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    out = make_tiny_model(
        args.out_dir, arch=args.arch, seed=args.seed, preset=args.preset, **overrides
    )
    print(f"wrote a random {args.arch} checkpoint ({args.preset}) to {out}")
    return 0


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distserve", description="LLM serving with disaggregated prefill and decode."
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runners: dict[str, Callable[[argparse.Namespace], int]] = {}

    p = sub.add_parser("make-tiny-model", help="write a small random Hugging Face checkpoint")
    _add_make_tiny_model(p)
    runners["make-tiny-model"] = _run_make_tiny_model

    for name, (module, add_name, run_name, help_text) in _COMMANDS.items():
        if not _available(module):
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        getattr(mod, add_name)(p)
        runners[name] = getattr(mod, run_name)
    parser.set_defaults(_runners=runners)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args._runners[args.command](args)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:  # bad user input anywhere below: one clear line, no traceback
        print(f"distserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
