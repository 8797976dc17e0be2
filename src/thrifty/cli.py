"""The `thrifty` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from thrifty.errors import ThriftyError


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="Generate text with a model (chat template applied by default).",
        description="Answer one or more prompts with a model. Greedy by default; "
                    "set --temperature to sample.",
    )
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--model", default=None,
                   help="Hugging Face model directory, .gguf file, or 'smollm2-135m-instruct' (default)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("-n", "--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--system", default=None, help="system prompt (chat mode)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--no-chat", action="store_true", help="raw completion, no chat template")
    p.add_argument("--no-stream", action="store_true", help="print only when finished")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default) or float32")
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> None:
    # Imported here so `thrifty --help` answers instantly, without loading torch.
    from thrifty.generation import generate
    from thrifty.loading.loader import load_model
    from thrifty.streaming import TextStreamer

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    stream = len(args.prompts) == 1 and args.num_samples == 1 and not args.no_stream
    streamer = TextStreamer(tokenizer, sys.stdout) if stream else None
    completions = generate(
        model, tokenizer, args.prompts if len(args.prompts) > 1 else args.prompts[0],
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, num_return_sequences=args.num_samples,
        seed=args.seed, stop=args.stop, chat=not args.no_chat, system_prompt=args.system,
        on_step=streamer.on_step if streamer else None,
    )
    if streamer is not None:
        streamer.finish(completions[0].text)
        return
    for c in completions:
        if len(completions) > 1:
            sample = f", sample {c.sample_index + 1}" if args.num_samples > 1 else ""
            print(f"=== prompt {c.prompt_index + 1}{sample} ({c.finish_reason}) ===")
        print(c.text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thrifty", description="Fine-tune and run LLMs on the hardware you have."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ThriftyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
