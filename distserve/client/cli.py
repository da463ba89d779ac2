"""``distserve generate PROMPT``: one request to a running router, from the command line.

The top-level CLI (``distserve/cli.py``) wires it in::

    sub = subparsers.add_parser("generate", help="send one request to a running router")
    add_generate_arguments(sub)
    ...
    return run_generate(args)

Plain output is the text (streamed as it arrives with ``--stream``) followed by one summary line
on stderr; ``--json`` prints the completion as one JSON object (with ``--stream``: one JSON
object per chunk). An error prints one ``error: ...`` line on stderr and exits non-zero:
2 for a refused request, 3 for an unreachable router, 4 for a timeout, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from distserve.client._request import DEFAULT_ENDPOINT
from distserve.client.client import Client
from distserve.client.errors import (
    DistserveError,
    InvalidRequest,
    RequestTimeout,
    ServerUnavailable,
)
from distserve.client.types import Completion

EXIT_CODES: dict[type[DistserveError], int] = {
    InvalidRequest: 2,
    ServerUnavailable: 3,
    RequestTimeout: 4,
}


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="prompt text (sent as text; the router tokenizes it)")
    parser.add_argument(
        "--endpoint", default=DEFAULT_ENDPOINT, help="router gRPC address (default: %(default)s)"
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="new tokens at most")
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--stop", action="append", default=None, help="stop string (repeat for several)"
    )
    parser.add_argument("--ignore-eos", action="store_true", help="continue past end-of-sequence")
    parser.add_argument("--stream", action="store_true", help="print text as it arrives")
    parser.add_argument("--client-id", default="", help="fairness key of the caller")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds (default: 600)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run_generate(args: argparse.Namespace) -> int:
    """Run the ``generate`` subcommand; returns the process exit code."""
    options: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos,
        "client_id": args.client_id,
    }
    try:
        with Client(args.endpoint, timeout_s=args.timeout) as client:
            if args.stream:
                _print_stream(client, args.prompt, options, as_json=args.json)
            else:
                _print_completion(client.generate(args.prompt, **options), as_json=args.json)
    except DistserveError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return EXIT_CODES.get(type(e), 1)
    except ValueError as e:  # a malformed --endpoint
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _print_stream(client: Client, prompt: str, options: dict[str, Any], *, as_json: bool) -> None:
    last = None
    for chunk in client.stream(prompt, **options):
        if as_json:
            print(json.dumps(dataclasses.asdict(chunk)), flush=True)
        else:
            print(chunk.text, end="", flush=True)
        last = chunk
    if not as_json:
        print()
        if last is not None:
            usage = last.usage
            tokens = usage.completion_tokens if usage is not None else "?"
            print(
                f"[finish={last.finish_reason} tokens={tokens} e2e={last.elapsed_s:.3f}s]",
                file=sys.stderr,
            )


def _print_completion(done: Completion, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(dataclasses.asdict(done)))
        return
    print(done.text)
    ttft = f"{done.ttft_s:.3f}s" if done.ttft_s is not None else "-"
    tpot = f"{done.tpot_s * 1000:.1f}ms" if done.tpot_s is not None else "-"
    print(
        f"[finish={done.finish_reason} prompt={done.usage.prompt_tokens} "
        f"cached={done.usage.cached_tokens} tokens={done.usage.completion_tokens} "
        f"ttft={ttft} tpot={tpot} e2e={done.e2e_s:.3f}s]",
        file=sys.stderr,
    )
