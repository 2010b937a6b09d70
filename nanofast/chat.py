"""Chat with a trained model in the terminal: `python -m nanofast.chat`.

Multi-turn by default (type a message, the answer streams back; `/clear` starts over, `/quit` or
end of input exits); `-p "prompt"` answers once and exits. The default checkpoint is the newest of
sft, mid and base under the data root, in that order of preference.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import torch

from nanofast.checkpoint import CheckpointError, latest_step, load_nanochat
from nanofast.common import DTYPES, autodetect_device, base_dir, default_dtype, parse_dtype
from nanofast.detokenize import special_display, stream_text
from nanofast.engine import Engine, SamplingParams
from nanofast.model import GPT
from nanofast.kernels import BACKENDS
from nanofast.ops import KERNEL_BACKEND_HELP, set_kernel_backend
from nanofast.tokenizer import TOKENIZER_FILE, Tokenizer

CHECKPOINT_STAGES = ("sft", "mid", "base")  # preference order: the most post-trained first
NO_CHECKPOINT = "run `python train.py --stage all` first or pass --checkpoint"


def default_checkpoint(base: Path | None = None) -> Path | None:
    """The most post-trained checkpoint folder (sft, then mid, then base) holding a model file: of
    `base` itself if it is a run directory, else of the most recently trained run in `<base>/runs/`;
    None if there is none."""
    root = Path(base) if base is not None else base_dir()

    def trained_at(checkpoints: Path) -> float:  # a stage folder's mtime moves with every file saved in it
        return max((d.stat().st_mtime for d in checkpoints.iterdir() if d.is_dir()), default=0.0)

    runs = sorted((root / "runs").glob("*/checkpoints"), key=trained_at, reverse=True)
    for checkpoints in [root / "checkpoints", *runs]:
        for stage in CHECKPOINT_STAGES:
            if latest_step(checkpoints / stage) is not None:
                return checkpoints / stage
    return None


def find_tokenizer_dir(checkpoint: Path) -> Path:
    """Where the tokenizer of `checkpoint` lives: beside the `checkpoints/` folder that holds it
    (nanofast's `<base>/checkpoints/<stage>` and nanochat's `<base>/<x>_checkpoints/<tag>` both
    put it at `<base>/tokenizer`), else the data root's."""
    directory = checkpoint.parent if checkpoint.is_file() else checkpoint
    candidates = [directory.resolve().parents[1] / "tokenizer", base_dir() / "tokenizer"]
    for c in candidates:
        if (c / TOKENIZER_FILE).is_file() or (c / "tokenizer.pkl").is_file():
            return c
    raise FileNotFoundError(f"no tokenizer found for checkpoint {checkpoint} (looked in "
                            f"{', '.join(str(c) for c in candidates)}): pass --tokenizer DIR")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """A nanofast tokenizer directory (`tokenizer.json`), or nanochat's (`tokenizer.pkl`)."""
    directory = Path(directory)
    if (directory / TOKENIZER_FILE).is_file() or not (directory / "tokenizer.pkl").is_file():
        return Tokenizer.load(directory)
    # nanochat pickles its tiktoken Encoding. A pickle can name any callable, so only that one
    # class is let through: a crafted file is refused before anything in it runs.
    path = directory / "tokenizer.pkl"
    with open(path, "rb") as f:
        try:
            encoding = _EncodingOnly(f).load()
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: {e}") from None
    return Tokenizer(encoding)


class _EncodingOnly(pickle.Unpickler):
    """Unpickles a tiktoken Encoding (what nanochat's tokenizer.pkl holds) and nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("tiktoken.core", "Encoding"):
            import tiktoken

            return tiktoken.core.Encoding
        raise pickle.UnpicklingError(f"would construct {module}.{name} when loaded: refused, a nanochat "
                                     f"tokenizer holds only a tiktoken Encoding")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """Where the model is found and how it runs: the flags the chat CLI and the server share."""
    p.add_argument("--base-dir", default=None,
                   help="where train.py wrote its runs, searched for the newest checkpoint when --checkpoint is not "
                        "given (default: $NANOFAST_BASE_DIR, else ~/.cache/nanofast)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--kernel-backend", choices=BACKENDS, default=None, help=KERNEL_BACKEND_HELP)


def runtime(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    """(device, compute dtype) from `add_runtime_args`' flags; routes the kernel-backed ops."""
    device = args.device or autodetect_device()
    set_kernel_backend(args.kernel_backend, device)
    return device, parse_dtype(args.dtype) if args.dtype else default_dtype(device)


def load_model(checkpoint: str | Path | None, tokenizer_dir: str | Path | None,
               device: str, dtype: torch.dtype | None = None,
               base: str | Path | None = None) -> tuple[GPT, Tokenizer, Path]:
    """Load (model, tokenizer, checkpoint path), computing in `dtype` (default: the device's).
    Without `checkpoint`, the newest under `base` (--base-dir; default $NANOFAST_BASE_DIR, else
    ~/.cache/nanofast); none there is a CheckpointError that names where it looked and how to
    point elsewhere or make one."""
    if checkpoint is None:
        root = base_dir() if base is None else Path(base).expanduser()  # a lookup: never creates --base-dir
        checkpoint = default_checkpoint(root)
        if checkpoint is None:
            where = root / "runs" / "*" / "checkpoints"
            origin = "--base-dir" if base is not None else (
                "$NANOFAST_BASE_DIR" if os.environ.get("NANOFAST_BASE_DIR") else "the default base dir")
            raise CheckpointError(f"no checkpoint in {where}/{{{','.join(CHECKPOINT_STAGES)}}} ({origin}; set another "
                                  f"with --base-dir or NANOFAST_BASE_DIR): {NO_CHECKPOINT}")
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"--checkpoint {checkpoint} does not exist: {NO_CHECKPOINT}")
    model = load_nanochat(checkpoint, device, compute_dtype=dtype or default_dtype(device))
    tokenizer = load_tokenizer(tokenizer_dir if tokenizer_dir is not None else find_tokenizer_dir(checkpoint))
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's model has "
                              f"{model.config.vocab_size}: pass the --tokenizer it was trained with")
    return model, tokenizer, checkpoint


HELP = ("/help this help, /clear starts over, /quit (or Ctrl-D) exits; Ctrl-C stops an answer, "
        "Ctrl-C at the prompt exits")


def default_answer_tokens(context: int) -> int:
    """Most tokens per answer by default: a quarter of the context, at most 512, so that the first
    answers cannot fill a small model's context and end the conversation."""
    return max(1, min(512, context // 4))


def stop_tokens(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The ids that end an assistant turn (nanochat also stops at a stray BOS)."""
    return (tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id)


def stream_reply(engine: Engine, tokenizer: Tokenizer, prompt: list[int], params: SamplingParams,
                 generated: list[int] | None = None, display: dict[int, str] | None = None) -> Iterator[str]:
    """Run one request to completion on `engine`, yielding its text as it is produced.

    Every token the request produced (the stop token included) is appended to `generated`.
    display: how special tokens are shown (special_display); None shows them as their text.
    """
    request_id = engine.add_request(prompt, params)
    finished = False

    def tokens() -> Iterator[int]:
        nonlocal finished
        while not finished and engine.has_unfinished():
            for event in engine.step():
                if event.request_id != request_id:
                    continue
                if generated is not None:
                    generated.append(event.token)
                finished = finished or event.finished
                if not (event.finish_reason == "stop" and event.token in params.stop_token_ids):
                    yield event.token

    try:
        yield from stream_text(tokenizer, tokens(), display or {})
    finally:
        if not finished:  # the consumer stopped early (e.g. Ctrl-C): free the request's pages
            engine.abort(request_id)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="nanofast or nanochat checkpoint directory (or model_XXXXXX.pt)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: beside the checkpoints)")
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens per answer (default: a quarter of the model's context, at most 512, so "
                        "that a conversation keeps room for its next turns)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (turn i uses seed + i)")
    add_runtime_args(p)
    args = p.parse_args(argv)
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        p.error(f"--top-k must be >= 0, got {args.top_k}")
    if args.max_tokens is not None and args.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    return args


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Run the chat; answers go to `stdout`, banners and errors to `stderr`. Returns the exit code."""
    args = parse_args(argv)
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    try:
        device, dtype = runtime(args)
        model, tokenizer, checkpoint = load_model(args.checkpoint, args.tokenizer, device, dtype, args.base_dir)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=stderr)
        return 1
    engine = Engine(model, tokenizer, max_num_seqs=1)
    context = min(model.config.sequence_len, getattr(engine, "max_context", model.config.sequence_len))
    sp = {n: tokenizer.encode_special(n) for n in ("<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                                                   "<|assistant_end|>")}

    budget = args.max_tokens or default_answer_tokens(context)
    display = special_display(tokenizer, dim=stdout.isatty())

    # The conversation is kept as token ids, so tool calls stay special tokens in later prompts:
    # one list per exchange (user turn + the answer, closed by <|assistant_end|>).
    exchanges: list[list[int]] = []
    turn = 0

    def answer(text: str) -> bool:
        """Stream the reply to `text`; False (conversation unchanged) when it does not fit the context.
        Oldest exchanges are dropped (and the user told) until the answer has its budget of room."""
        nonlocal turn
        user = [sp["<|user_start|>"], *tokenizer.encode(text), sp["<|user_end|>"], sp["<|assistant_start|>"]]
        dropped = 0
        while exchanges and 1 + sum(map(len, exchanges)) + len(user) + budget > context:
            exchanges.pop(0)
            dropped += 1
        if dropped:
            print(f"(context full: dropped the {dropped} oldest exchange(s); /clear starts over)", file=stderr)
        prompt = [tokenizer.bos_token_id, *(t for ex in exchanges for t in ex), *user]
        room = context - len(prompt)
        if room < 1:
            print(f"error: the message is {len(prompt)} tokens, the model's context is {context}: "
                  "send a shorter one, /clear to start over", file=stderr)
            return False
        params = SamplingParams(max_tokens=min(budget, room), temperature=args.temperature,
                                top_k=args.top_k or None, seed=None if args.seed is None else args.seed + turn,
                                stop_token_ids=stop_tokens(tokenizer))
        generated: list[int] = []
        try:
            for piece in stream_reply(engine, tokenizer, prompt, params, generated, display):
                stdout.write(piece)
                stdout.flush()
        finally:  # an answer stopped with Ctrl-C stays in the conversation as far as it got
            stdout.write("\n")
            stdout.flush()
            stopped = bool(generated) and generated[-1] in params.stop_token_ids
            if stopped:
                generated[-1] = sp["<|assistant_end|>"]  # a stray BOS also closes the turn as assistant_end
            else:
                generated.append(sp["<|assistant_end|>"])  # cut or interrupted: close the turn anyway
            exchanges.append(user + generated)
            turn += 1
        if not stopped:
            limit = "--max-tokens" if params.max_tokens == budget else "the model's context"
            print(f"[answer cut at {len(generated) - 1} tokens: {limit}]", file=stderr)
        return True

    def read(interactive: bool) -> str | None:
        """One line from the user (None at the end of input); line editing and history on a terminal."""
        if interactive and stdin is sys.stdin:
            try:
                import readline  # noqa: F401  (input() then edits lines and keeps history)
            except ImportError:
                pass
            try:
                return input("\nYou: ")
            except EOFError:
                return None
        if interactive:
            stdout.write("\nYou: ")
            stdout.flush()
        return stdin.readline() or None

    def loop() -> int:
        """The one-shot answer, or the read-answer loop until /quit or end of input. Ctrl-C stops
        an answer; Ctrl-C at the prompt exits."""
        nonlocal turn
        if args.prompt is not None:
            if not args.prompt.strip():
                print("error: -p needs a non-empty prompt", file=stderr)
                return 2
            return 0 if answer(args.prompt) else 1
        interactive = stdin.isatty()
        print(f"nanofast chat: {checkpoint} on {device}. {HELP}", file=stderr)
        while True:
            line = read(interactive)
            if line is None:  # end of input
                break
            text = line.strip()
            if not text:
                continue
            if text == "/quit":
                break
            if text in ("/help", "/?"):
                print(HELP, file=stderr)
                continue
            if text == "/clear":
                exchanges.clear()
                turn = 0
                print("(conversation cleared)", file=stderr)
                continue
            if interactive:
                stdout.write("Assistant: ")
            try:
                answer(text)
            except KeyboardInterrupt:  # the request is aborted by stream_reply; the chat goes on
                print("(stopped)", file=stderr)
        return 0

    try:
        with torch.inference_mode():
            return loop()
    except KeyboardInterrupt:  # Ctrl-C: stream_reply has already aborted the running request
        stdout.write("\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
