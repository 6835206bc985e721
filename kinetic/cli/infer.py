"""``kinetic generate``, ``kinetic chat`` and ``kinetic serve``: a checkpoint's
:class:`~kinetic.infer.engine.Engine` behind a prompt list, a terminal chat, or an OpenAI-compatible
HTTP server (:mod:`kinetic.infer.server`).

The three share the checkpoint, device and decoding flags (``add_device_args``, ``add_decode_args``);
``device_options`` and ``engine_options`` turn those flags into the keyword arguments of
``Engine.from_pretrained``. ``kinetic eval`` takes the same device flags.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import replace

from kinetic.device import DTYPES, resolve_device
from kinetic.errors import UserError
from kinetic.infer import server
from kinetic.infer.engine import Engine, SamplingParams
from kinetic.infer.server import Limits


# ---------------------------------------------------------------------- flags
def _add_common_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (with tokenizer.json) or run dir")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.8, help="0 (or below 1e-5) = greedy")
    p.add_argument("--top-k", type=int, default=40, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less than this times as likely as the most likely one; 0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--max-context", type=int, default=None,
                   help="prompt + completion token limit (default: the config's max_position_embeddings)")
    add_device_args(p)
    add_decode_args(p)
    p.add_argument("--show-budget", action="store_true",
                   help="print the memory budget (cache + weights) for each prompt before running it")


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``, shared by ``kinetic generate``, ``chat`` and ``serve``."""
    p.add_argument("--device", default="auto", help="auto (a GPU when one is visible, else the CPU), cpu, "
                   "cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="weights and activations (default float32; bfloat16 halves a GPU's memory traffic)")


def device_options(args: argparse.Namespace) -> dict:
    """``device`` and ``dtype`` for Engine.from_pretrained from the flags; ValueError naming --device."""
    return dict(device=resolve_device(args.device, setting="--device"), dtype=DTYPES[args.dtype])


def add_decode_args(p: argparse.ArgumentParser) -> None:
    """Decoding flags shared by ``kinetic generate``, ``chat`` and ``serve``."""
    p.add_argument("--no-speculative", action="store_true",
                   help="decode one token per step even if the checkpoint has MTP layers")
    p.add_argument("--draft-tokens", type=int, default=2, help="MTP draft tokens per speculative step")
    p.add_argument("--speculative-max-batch", type=int, default=1,
                   help="draft only while at most this many sequences run (a batch takes plain steps)")
    p.add_argument("--prefill-chunk", type=int, default=8192, help="prompt tokens per prefill pass")
    p.add_argument("--compile", action="store_true",
                   help="compile the plain decode step (torch.compile; CUDA graphs on a GPU); implies "
                   "--no-speculative. The first steps compile, which takes seconds")


def engine_options(args: argparse.Namespace) -> dict:
    """Engine keyword arguments from the decoding flags."""
    return dict(speculative=False if args.no_speculative or args.compile else None,
                draft_tokens=args.draft_tokens, prefill_chunk=args.prefill_chunk,
                compile_decode=args.compile, speculative_max_batch=args.speculative_max_batch)


# SamplingParams fields -> the flags that set them, for error messages
FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
         "top_p": "--top-p", "min_p": "--min-p", "seed": "--seed", "stop_strings": "--stop",
         "draft_tokens": "--draft-tokens", "prefill_chunk": "--prefill-chunk", "max_context": "--max-context",
         "max_batch": "--max-active", "speculative_max_batch": "--speculative-max-batch"}


def flag_error(err: Exception) -> UserError:
    """A ValueError from the engine, its field names replaced by the flags that set them."""
    message = str(err)
    for field, flag in FLAGS.items():
        message = re.sub(rf"(?<![\w-]){field}(?=[=\s!])", flag, message)
    return UserError(message)


def add_generate_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``kinetic generate``."""
    _add_common_args(p, max_new_tokens=48)
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--chat", action="store_true", help="send each prompt as a user message through the "
                   "chat template")


def add_chat_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``kinetic chat``."""
    _add_common_args(p, max_new_tokens=256)
    p.add_argument("--system", default=None, help="system message")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``kinetic serve``."""
    d = Limits()
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (with tokenizer.json) or run dir")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 = every one)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the dir name)")
    p.add_argument("--max-context", type=int, default=None,
                   help="prompt + completion token limit (default: the config's max_position_embeddings)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="largest max_tokens per request")
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    p.add_argument("--max-n", type=int, default=d.max_n, help="choices per request")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests before 429")
    p.add_argument("--max-active", type=int, default=d.max_active, help="sequences generated together")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes)
    add_device_args(p)
    add_decode_args(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


# ---------------------------------------------------------------------- commands
def _engine_and_params(args: argparse.Namespace) -> tuple[Engine, SamplingParams]:
    try:
        engine = Engine.from_pretrained(args.checkpoint, max_context=args.max_context, **device_options(args),
                                        **engine_options(args))
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                                stop_strings=tuple(args.stop))
    except ValueError as err:
        raise flag_error(err) from None
    return engine, params


def cmd_generate(args: argparse.Namespace) -> int:
    """``kinetic generate``: print a continuation of each ``--prompt`` as it is generated. Each
    prompt is seeded with ``--seed``, so its text does not depend on the other prompts."""
    engine, params = _engine_and_params(args)
    if args.chat:
        params = replace(params, stop_token_ids=engine.chat_stop_token_ids)
    for prompt in args.prompt:
        try:
            ids = engine.encode_chat([{"role": "user", "content": prompt}]) if args.chat else prompt
            if args.show_budget:
                n = len(ids) if not isinstance(ids, str) else len(engine.encode(ids))
                print(f"[{engine.describe_budget(engine.capacity(n, params.max_new_tokens))}]")
            print(f"--- {prompt!r}\n{'' if args.chat else prompt}", end="", flush=True)
            for delta in engine.stream(ids, params):
                print(delta.text, end="", flush=True)
        except ValueError as err:
            print()
            raise UserError(f"--prompt {prompt!r}: {flag_error(err)}") from None
        print("\n")
    if engine.speculative and engine.spec_stats.rounds:
        st = engine.spec_stats
        print(f"[speculative decoding: {st.drafted} drafted, {st.accepted} accepted "
              f"({st.acceptance_rate:.0%}); {st.mean_accepted_length:.2f} tokens per model pass]")
    return 0


CHAT_HELP = "/reset clears the history, /quit or Ctrl-D leaves, Ctrl-C stops a reply"


def _fit_history(engine: Engine, messages: list[dict], max_new_tokens: int) -> list[int]:
    """Prompt ids of the newest turns that leave room for the reply; the system message stays."""
    while True:
        ids = engine.encode_chat(messages)
        rest = [i for i, m in enumerate(messages) if m["role"] != "system"]
        if len(ids) + max_new_tokens <= engine.max_context or len(rest) <= 1:
            return ids
        del messages[rest[0]]  # forget the oldest turn


def cmd_chat(args: argparse.Namespace) -> int:
    """``kinetic chat``: an interactive terminal chat using the checkpoint's chat template."""
    engine, params = _engine_and_params(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print(f"chat with {args.checkpoint} ({CHAT_HELP})")
    turn = 0
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        except UnicodeDecodeError as err:  # stdin is not UTF-8: say so and keep chatting
            print(f"error: the input is not valid UTF-8 ({err.reason} at byte {err.start}); type it again")
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages = list(system)
            print("(history cleared)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        ids = _fit_history(engine, messages, params.max_new_tokens)
        turn_params = replace(params, seed=params.seed + turn, stop_token_ids=engine.chat_stop_token_ids)
        turn += 1
        reply = []
        print("assistant> ", end="", flush=True)
        try:
            for delta in engine.stream(ids, turn_params):
                print(delta.text, end="", flush=True)
                reply.append(delta.text)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        except ValueError as err:  # the message alone is longer than the context
            print(f"error: {err}")
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_serve(args: argparse.Namespace) -> int:
    """``kinetic serve``: the OpenAI-compatible server on ``--host``:``--port``."""
    names = ("max_tokens", "default_max_tokens", "max_n", "max_queue", "max_active", "max_request_bytes")
    bad = [f"--{n.replace('_', '-')}={getattr(args, n)}" for n in names if getattr(args, n) < 1]
    if bad:
        raise UserError(f"{', '.join(bad)}: limits must be >= 1")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a TCP port: give one in 1..65535 (0 = any free port)")
    limits = Limits(**{n: getattr(args, n) for n in names})
    try:
        server.run(args.checkpoint, args.host, args.port, model_name=args.model_name, limits=limits,
                   max_context=args.max_context, log_level=args.log_level, **device_options(args),
                   **engine_options(args), max_batch=args.max_active)
    except ValueError as err:  # a bad checkpoint config or --max-context
        raise flag_error(err) from None
    return 0


# ---------------------------------------------------------------------- registration
def register(sub: argparse._SubParsersAction) -> None:
    """Add ``generate``, ``chat`` and ``serve`` to the ``kinetic`` subparsers."""
    p = sub.add_parser("generate", help="continue prompts from a checkpoint (streamed)")
    add_generate_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="interactive terminal chat with a checkpoint")
    add_chat_args(p)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server, chat page at /")
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)
