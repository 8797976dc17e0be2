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


def add_sft_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sft", help="Supervised fine-tuning (LoRA, QLoRA or full) from a YAML config.",
        description="Fine-tune a model on instruction data. CONFIG is a YAML file of SFTConfig fields "
                    "(see examples/sft_default.yaml); key=value arguments override it, e.g. "
                    "`thrifty sft examples/sft_default.yaml max_steps=20 learning_rate=1e-4`.",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a config field")
    p.set_defaults(run=run_sft)


def run_sft(args: argparse.Namespace) -> None:
    from thrifty.sft_config import load_sft_config

    # Check the whole config before the (slow) imports and model load.
    config = load_sft_config(args.config, args.overrides)
    from thrifty.loading.loader import load_model
    from thrifty.sft_trainer import SFTTrainer

    model, tokenizer = load_model(config.model_name_or_path, dtype=config.dtype)
    SFTTrainer(model, tokenizer, config).train()


def add_merge_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge", help="Merge a LoRA adapter into its base model and save a Hugging Face model directory.",
        description="Fold a LoRA adapter (PEFT format, e.g. out/sft-default/adapter) into the base model's "
                    "weights and write a Hugging Face model directory that transformers, thrifty and "
                    "llama.cpp's converter load. The base model is the adapter's base_model_name_or_path "
                    "unless --model is given. Adapters trained with QLoRA are merged into the unquantized base.",
    )
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--output", "-o", required=True, help="output directory for the merged model")
    p.add_argument("--model", default=None,
                   help="base model: Hugging Face directory, .gguf file or 'smollm2-135m-instruct' "
                        "(default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the merged weights: bfloat16 (default) or float32")
    p.set_defaults(run=run_merge)


def run_merge(args: argparse.Namespace) -> None:
    from pathlib import Path

    from thrifty.adapters import load_adapter, read_adapter_config
    from thrifty.export import save_hf_model
    from thrifty.loading.loader import load_model, parse_dtype
    from thrifty.lora import merge_lora

    adapter = Path(args.adapter)
    if not adapter.is_dir():
        raise ThriftyError(f"{adapter}: adapter directory not found.")
    _, raw = read_adapter_config(adapter)
    base = args.model or raw.get("base_model_name_or_path")
    if not base:
        raise ThriftyError(f"{adapter / 'adapter_config.json'}: no base_model_name_or_path; pass the base "
                           "model with --model.")
    dtype = parse_dtype(args.dtype)
    # Merge in float32 (delta added to the exact base weight), round once to `dtype`.
    model, tokenizer = load_model(base, dtype="float32", device="cpu")
    load_adapter(model, adapter)
    merge_lora(model, dtype=dtype)
    model.to(dtype)
    path = save_hf_model(model, tokenizer, Path(args.output))
    print(f"merged {adapter} into {base}: wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thrifty", description="Fine-tune and run LLMs on the hardware you have."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    add_sft_parser(subparsers)
    add_merge_parser(subparsers)
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
