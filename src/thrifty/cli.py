"""The `thrifty` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from thrifty.errors import ThriftyError
from thrifty.training import torchrun_errors


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="Generate text with a model (chat template applied by default).",
        description="Answer one or more prompts with a model. Greedy by default; "
                    "set --temperature to sample.",
    )
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("-n", "--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--no-chat", action="store_true", help="raw completion, no chat template")
    p.add_argument("--no-stream", action="store_true", help="print only when finished")
    p.set_defaults(run=run_generate)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Hugging Face model directory, .gguf file, hub id in the local cache, or "
                        "'smollm2-135m-instruct' (default; with --adapter: the adapter's base model)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (PEFT format) to run on its base model")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default) or float32")
    p.add_argument("--dequantize", action="store_true",
                   help="run a quantized .gguf from full-precision copies of its weights (default: from the "
                        "file's own blocks, in about a third of the memory)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt (chat mode)")


def load_for_inference(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """--model, with --adapter's LoRA adapter on top (unmerged: the engine runs it live)."""
    # Imported here so `thrifty --help` answers instantly, without loading torch.
    from thrifty.formats.open_model import open_model

    model, tokenizer, _ = open_model(args.model, args.adapter, dtype=args.dtype,
                                     quantize=None if args.dequantize else "auto")
    return model, tokenizer


def run_generate(args: argparse.Namespace) -> None:
    from thrifty.generation.engine import generate
    from thrifty.generation.streaming import TextStreamer

    model, tokenizer = load_for_inference(args)
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


def add_chat_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat", help="Talk with a model (or a fine-tune's adapter) in the terminal, turn by turn.",
        description="A multi-turn chat in the terminal, streamed. Type a message and Enter; /reset starts a new "
                    "conversation, /exit (or Ctrl-D) ends. Greedy by default; set --temperature to sample.",
    )
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.set_defaults(run=run_chat)


def run_chat(args: argparse.Namespace) -> None:
    from thrifty.generation.engine import generate
    from thrifty.generation.streaming import TextStreamer
    from thrifty.model.inference_plan import InferencePlan

    model, tokenizer = load_for_inference(args)
    plan = InferencePlan.build(model)  # the weights never change during a chat: one plan for every turn
    if tokenizer.chat_template is None:
        raise ThriftyError("this model has no chat template, so it cannot chat; use `thrifty generate --no-chat`.")
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: /reset starts over, /exit or Ctrl-D ends", file=sys.stderr)
    messages: list[dict[str, str]] = []
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = []
            continue
        messages.append({"role": "user", "content": text})
        streamer = TextStreamer(tokenizer, sys.stdout)
        (reply,) = generate(model, tokenizer, [messages], max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            seed=args.seed, system_prompt=args.system, on_step=streamer.on_step, plan=plan)
        streamer.finish(reply.text)
        messages.append({"role": "assistant", "content": reply.text})


def add_config_command(subparsers: argparse._SubParsersAction, name: str, help: str, description: str,
                       run: Callable[[argparse.Namespace], None]) -> None:
    """A training command: `thrifty NAME CONFIG.yaml [key=value ...]`."""
    p = subparsers.add_parser(name, help=help, description=description)
    p.add_argument("config", help="YAML config file (- for standard input)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a config field")
    p.set_defaults(run=run)


def add_sft_parser(subparsers: argparse._SubParsersAction) -> None:
    add_config_command(
        subparsers, "sft", run=run_sft, help="Supervised fine-tuning (LoRA, QLoRA or full) from a YAML config.",
        description="Fine-tune a model on instruction data. CONFIG is a YAML file of SFTConfig fields "
                    "(see examples/sft_default.yaml); key=value arguments override it, e.g. "
                    "`thrifty sft examples/sft_default.yaml max_steps=20 learning_rate=1e-4`.",
    )


def run_sft(args: argparse.Namespace) -> None:
    from thrifty.sft.config import load_sft_config

    # Check the whole config before the (slow) imports and model load.
    config = load_sft_config(args.config, args.overrides)
    from thrifty.sft.trainer import SFTTrainer

    config = resolve_base(config)
    check_output_dir(config)
    check_memory_plan(config, "sft")
    model, tokenizer, config = open_base_for_training(config)
    result = SFTTrainer(model, tokenizer, config).train()
    if not _first_process():
        return
    if result.output_path is not None and result.output_path.name == "adapter":
        merged = result.output_path.parent / "merged"
        print(f"next: thrifty chat --adapter {result.output_path}\n"
              f"      thrifty merge {result.output_path} --output {merged}")
    elif result.output_path is not None:
        print(f"next: thrifty generate --model {result.output_path} \"your prompt\"")


def resolve_base(config):  # type: ignore[no-untyped-def]
    """The config naming its base: its model_name_or_path, or with an `adapter` and no
    model named, the adapter's recorded base (open_model's rule)."""
    import dataclasses

    from thrifty.formats.open_model import base_for

    if config.adapter is not None and not config.model_name_or_path:
        config = dataclasses.replace(config, model_name_or_path=base_for(config.adapter, None))
    return config


def memory_plan(config, kind: str):  # type: ignore[no-untyped-def]
    from thrifty.training.memory_plan import plan_grpo, plan_sft, read_model_facts

    facts = read_model_facts(config.model_name_or_path)
    if kind == "sft":
        return plan_sft(facts, config)
    return plan_grpo(facts, config, longest_task_prompt(config, facts.source))


def longest_task_prompt(config, source: str) -> int | None:  # type: ignore[no-untyped-def]
    """Tokens of the longest of 64 of a built-in task's prompts as the run renders them
    (its real prompts are often far below max_prompt_length), or None without a task."""
    if config.task is None:
        return None
    from thrifty.formats.loader import load_tokenizer
    from thrifty.generation.engine import render_prompt
    from thrifty.grpo.tasks import get_task

    tokenizer = load_tokenizer(source)
    rows = get_task(config.task, **config.task_settings).rows("train", 64, seed=config.seed)
    chat = tokenizer.chat_template is not None
    return max(len(render_prompt(tokenizer, row["prompt"], chat, config.system_prompt, config.max_prompt_length))
               for row in rows)


def check_output_dir(config) -> None:  # type: ignore[no-untyped-def]
    """Refuse an output_dir another run holds, or holds the results of, before loading."""
    from thrifty.training.run import check_output_dir as check

    if _first_process():
        check(config)


def check_memory_plan(config, kind: str) -> None:  # type: ignore[no-untyped-def]
    """Print the run's memory plan and stop before loading if it does not fit."""
    from thrifty.training.memory_plan import check_fits

    plan = memory_plan(config, kind)
    if _first_process():
        print(plan.table(), flush=True)
    check_fits(plan, config)


def add_plan_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="Predict a training run's peak memory from its config, without loading the model.",
        description="Print the predicted peak RSS of `thrifty sft|grpo CONFIG`, part by part, from the model's "
                    "config and the batch fields, and whether it fits in the memory available now.")
    p.add_argument("kind", choices=["sft", "grpo"], help="the command the config is for")
    p.add_argument("config", help="YAML config file (- for standard input)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a config field")
    p.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> None:
    from thrifty.training.memory_plan import GIB, available_memory

    if args.kind == "sft":
        from thrifty.sft.config import load_sft_config as load
    else:
        from thrifty.grpo.config import load_grpo_config as load
    config = resolve_base(load(args.config, args.overrides))
    plan = memory_plan(config, args.kind)
    print(plan.table())
    available = available_memory()
    if available is not None:
        verdict = "fits" if plan.total <= available else "does NOT fit (the run would stop before loading)"
        print(f"available now: {available / GIB:.2f} GiB: {verdict}")


def open_base_for_training(config):  # type: ignore[no-untyped-def]
    """(model, tokenizer, config) for a training config whose base is resolved
    (resolve_base). The run puts the adapter on it."""
    from thrifty.formats.loader import load_model

    config = resolve_base(config)
    # A quantized base is quantized as it is read: no full-precision copy first.
    model, tokenizer = load_model(config.model_name_or_path, dtype=config.dtype, quantize=config.quantize)
    return model, tokenizer, config


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

    from thrifty.formats.hf_export import save_hf_model
    from thrifty.formats.loader import parse_dtype
    from thrifty.formats.open_model import open_model

    if Path(args.output).suffix == ".gguf":
        raise ThriftyError(f"--output {args.output}: merge writes a Hugging Face directory; for a GGUF file use "
                           f"`thrifty export-gguf {args.adapter} --output {args.output}`.")
    dtype = parse_dtype(args.dtype)
    model, tokenizer, base = open_model(args.model, args.adapter, merge=True, dtype=dtype)
    path = save_hf_model(model, tokenizer, Path(args.output))
    print(f"merged {args.adapter} into {base}: wrote {path}")


def add_export_gguf_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-gguf", help="Write a model or a LoRA fine-tune as a GGUF file for llama.cpp, Ollama, LM Studio.",
        description="Write SOURCE as one GGUF file, with its tokenizer and chat template, written by Thrifty "
                    "(no llama.cpp build). SOURCE is a Hugging Face model directory, a .gguf file, "
                    "'smollm2-135m-instruct', or a LoRA adapter directory (merged into its base on the fly; a QLoRA "
                    "adapter into the unquantized base).",
    )
    p.add_argument("source", help="model directory, .gguf file, model name, or LoRA adapter directory")
    p.add_argument("--output", "-o", required=True, help="the .gguf file to write")
    p.add_argument("--quantization", "-q", default="f16",
                   help="f16 (default), bf16, f32, q8_0, q4_0, q4_k_m, q5_k_m or q6_k (Unsloth's names: "
                        "not_quantized, fast_quantized, quantized)")
    p.add_argument("--model", default=None, help="with an adapter SOURCE: its base model (default: the adapter's "
                                                 "base_model_name_or_path)")
    p.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile beside the file")
    p.set_defaults(run=run_export_gguf)


def run_export_gguf(args: argparse.Namespace) -> None:
    from pathlib import Path

    from thrifty.formats.gguf_export import export_gguf, write_ollama_modelfile
    from thrifty.formats.loader import load_model
    from thrifty.formats.open_model import open_model
    from thrifty.formats.peft_adapter import is_adapter_dir

    source = Path(args.source)
    if is_adapter_dir(source):
        model, tokenizer, _ = open_model(args.model, source, merge=True, dtype=None)
    else:
        model, tokenizer = load_model(args.source, dtype="float32", device="cpu")
    path = export_gguf(model, tokenizer, Path(args.output), args.quantization, progress=True)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB, {args.quantization})")
    if args.ollama:
        modelfile = write_ollama_modelfile(path, tokenizer)
        print(f"wrote {modelfile}; to run it in Ollama:\n  ollama create {path.stem} -f {modelfile}\n"
              f"  ollama run {path.stem}")


def add_grpo_parser(subparsers: argparse._SubParsersAction) -> None:
    add_config_command(
        subparsers, "grpo", run=run_grpo, help="GRPO reinforcement learning with reward functions, from a YAML config.",
        description="Train a model with GRPO on a built-in task (e.g. arithmetic) or your own prompts. CONFIG is "
                    "a YAML file of GRPOConfig fields (see examples/grpo_arithmetic.yaml); key=value arguments "
                    "override it, e.g. `thrifty grpo examples/grpo_arithmetic.yaml max_steps=10`.",
    )


def run_grpo(args: argparse.Namespace) -> None:
    from thrifty.grpo.config import load_grpo_config

    config = load_grpo_config(args.config, args.overrides)  # check it all before loading the model
    if config.task is None and config.train_file is None:
        raise ThriftyError(f"{args.config}: set `task` (e.g. task: arithmetic) or `train_file`. From the command "
                           "line the reward functions come from a built-in task; for your own reward functions "
                           "use the Python API (GRPOTrainer(..., reward_funcs=[...])).")
    if config.task is None:
        raise ThriftyError(f"{args.config}: train_file needs reward functions, which the command line cannot "
                           "take; use a built-in `task`, or the Python API with reward_funcs=[...].")
    from thrifty.grpo.trainer import GRPOTrainer

    config = resolve_base(config)
    check_output_dir(config)
    check_memory_plan(config, "grpo")
    model, tokenizer, config = open_base_for_training(config)
    result = GRPOTrainer(model, tokenizer, config=config).train()
    if result.output_path is not None and result.output_path.name == "adapter" and _first_process():
        print(f"next: thrifty eval --task {config.task} --adapter {result.output_path}")


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="Score a model (and adapter) on a built-in task's held-out problems.",
        description="Accuracy (greedy) and, with --k, unbiased pass@k (sampled) on a task's held-out split, "
                    "checked by the task's exact checker, e.g. `thrifty eval --task arithmetic --adapter "
                    "out/grpo/adapter --num-samples 100 --k 4`.",
    )
    p.add_argument("--task", required=True, help="built-in task: arithmetic, countdown, gsm; or reasoning_gym:<dataset>")
    p.add_argument("--task-setting", action="append", default=[], metavar="key=value",
                   help="a task setting (repeatable), e.g. operand_digits=[1,1]")
    add_model_arguments(p)
    p.add_argument("--num-samples", type=int, default=100, help="held-out problems (default 100)")
    p.add_argument("--k", type=int, default=0, help="also report pass@k from sampled completions (0: off)")
    p.add_argument("--n", type=int, default=None, help="samples per problem for pass@k (default: k)")
    p.add_argument("--temperature", type=float, default=0.7, help="for pass@k sampling (default 0.7)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    import json

    import yaml

    if args.num_samples < 1:
        raise ThriftyError(f"--num-samples must be at least 1, got {args.num_samples}.")
    if args.k < 0 or (args.n is not None and args.n < max(args.k, 1)):
        raise ThriftyError(f"--k must be 0 or more and --n at least k; got k={args.k}, n={args.n}.")
    if args.k > 0 and args.temperature <= 0:
        raise ThriftyError("pass@k needs sampling: give --temperature > 0.")
    settings = {}
    for item in args.task_setting:
        key, sep, value = item.partition("=")
        if not sep:
            raise ThriftyError(f"--task-setting {item!r} is not of the form key=value.")
        settings[key.strip()] = yaml.safe_load(value)
    from thrifty.grpo.tasks import get_task

    task = get_task(args.task, **settings)
    from thrifty.grpo.evaluation import evaluate_task

    model, tokenizer = load_for_inference(args)
    result = evaluate_task(model, tokenizer, task, num_samples=args.num_samples, k=args.k,
                           num_samples_per_problem=args.n, temperature=args.temperature,
                           max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.json:
        print(json.dumps({"task": args.task, "num_problems": result.num_problems, "accuracy": result.accuracy,
                          "k": result.k, "pass_at_k": result.pass_at_k, "mean_length": result.mean_length,
                          "seconds": round(result.seconds, 2)}))
    else:
        for example in result.examples:
            prompt = example["prompt"]
            shown = prompt if isinstance(prompt, str) else prompt[-1].get("content", "")
            print(f"> {shown}\n  {example['completion'].strip()}  [{'correct' if example['correct'] else 'wrong'}]")
        print(f"{args.task}: {result.summary()}")


def add_recipe_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "recipe", help="Run a whole pipeline: `reasoning` = SFT cold start, then GRPO (DeepSeek-R1's recipe).",
        description="reasoning: teach the model to answer in <think>...</think><answer>...</answer> with a "
                    "supervised cold start on worked solutions, then GRPO from that adapter; reports held-out "
                    "accuracy and format compliance of the base model, after SFT and after GRPO. key=value "
                    "arguments override the recipe's fields (see thrifty/recipes/reasoning.py).",
    )
    p.add_argument("name", choices=["reasoning"])
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a recipe field")
    p.set_defaults(run=run_recipe)


def run_recipe(args: argparse.Namespace) -> None:
    from thrifty.recipes.reasoning import load_recipe, run_reasoning_recipe

    result = run_reasoning_recipe(load_recipe(args.overrides))
    print((result.output_dir / "results.md").read_text(), end="")
    print(f"wrote {result.output_dir}/results.md, recipe.png, samples.md; the adapter: "
          f"{result.output_dir}/grpo/adapter (thrifty chat --adapter {result.output_dir}/grpo/adapter)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thrifty", description="Fine-tune and run LLMs on the hardware you have."
    )
    from thrifty import __version__

    parser.add_argument("--version", action="version", version=f"thrifty {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    add_chat_parser(subparsers)
    add_sft_parser(subparsers)
    add_merge_parser(subparsers)
    add_export_gguf_parser(subparsers)
    add_grpo_parser(subparsers)
    add_eval_parser(subparsers)
    add_recipe_parser(subparsers)
    add_plan_parser(subparsers)
    return parser


def _first_process() -> bool:
    """False on every torchrun rank but 0, which alone prints what to do next."""
    return os.environ.get("RANK", "0") == "0"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ThriftyError as err:
        # Under torchrun every rank reports its own error, so say which rank speaks.
        line = f"error{torchrun_errors.rank_label()}: {err}"
        print(line, file=sys.stderr)
        torchrun_errors.record_for_torchrun(line)
        return 2
    except RuntimeError as err:
        if not torchrun_errors.another_rank_failed(err):
            raise
        line = torchrun_errors.peer_failure_line()
        print(line, file=sys.stderr)
        torchrun_errors.record_for_torchrun(line, consequence=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
