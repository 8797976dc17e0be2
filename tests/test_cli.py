"""The `thrifty` command line as a user runs it: real subprocesses on the default model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def thrifty(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "thrifty", *args], capture_output=True,
                          text=True, timeout=300)


def test_generate_answers_with_default_model() -> None:
    result = thrifty("generate", "What is the capital of France?", "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_generate_several_prompts_and_samples() -> None:
    result = thrifty("generate", "Name a colour.", "Name an animal.", "-n", "2", "--temperature", "0.8",
                     "--top-p", "0.9", "--seed", "1", "--max-new-tokens", "8", "--system", "Be brief.")
    assert result.returncode == 0, result.stderr
    headers = [line for line in result.stdout.splitlines() if line.startswith("=== prompt")]
    assert len(headers) == 4
    assert headers[0].startswith("=== prompt 1, sample 1") and headers[3].startswith("=== prompt 2, sample 2")


def test_raw_completion_without_chat_template() -> None:
    result = thrifty("generate", "The capital of France is", "--no-chat", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    result = thrifty("generate", "hi", "--model", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr


def test_bad_sampling_option_is_a_clear_error() -> None:
    result = thrifty("generate", "hi", "--top-p", "1.5")
    assert result.returncode == 2
    assert "top_p" in result.stderr and "Traceback" not in result.stderr


def test_version() -> None:
    from thrifty import __version__

    result = thrifty("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"thrifty {__version__}"


def test_chat_keeps_the_conversation_and_resets() -> None:
    """Each reply is the model's greedy answer to the whole conversation so far; /reset
    starts a new one."""
    from thrifty.formats.loader import load_model
    from thrifty.generation.engine import generate

    turns = ["What is 2 + 2?", "And what is that times 3?", "/reset", "What is 2 + 2?"]
    result = subprocess.run([sys.executable, "-m", "thrifty", "chat", "--max-new-tokens", "24"],
                            input="\n".join(turns) + "\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    model, tokenizer = load_model(quantize="gguf")  # the command runs a .gguf from its own blocks
    messages: list[dict[str, str]] = []
    expected = []
    for turn in turns:
        if turn == "/reset":
            messages = []
            continue
        messages.append({"role": "user", "content": turn})
        (reply,) = generate(model, tokenizer, [messages], max_new_tokens=24)
        messages.append({"role": "assistant", "content": reply.text})
        expected.append(reply.text)
    assert result.stdout == "".join(f"{text}\n" for text in expected)
    assert expected[0] == expected[2] and expected[1] != expected[0]


def test_generate_with_an_adapter(tmp_path: Path) -> None:
    import torch

    from thrifty.formats.loader import load_model
    from thrifty.formats.peft_adapter import save_adapter
    from thrifty.generation.engine import generate
    from thrifty.layers.lora import LoraConfig, apply_lora

    model, tokenizer = load_model(quantize="gguf")  # as the command opens the default model's .gguf
    base_answer = generate(model, tokenizer, "Name a colour.", max_new_tokens=12)[0].text
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_adapter(model, tmp_path / "adapter", "smollm2-135m-instruct")
    tuned_answer = generate(model, tokenizer, "Name a colour.", max_new_tokens=12)[0].text
    assert tuned_answer != base_answer
    result = thrifty("generate", "Name a colour.", "--adapter", str(tmp_path / "adapter"), "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout == tuned_answer + "\n"
    # chat --adapter: each turn is the fine-tune's answer to the conversation so far (its
    # one inference plan serves every turn).
    turns = ["Name a colour.", "And another one?"]
    chat = subprocess.run([sys.executable, "-m", "thrifty", "chat", "--adapter", str(tmp_path / "adapter"),
                           "--max-new-tokens", "12"], input="\n".join(turns) + "\n", capture_output=True, text=True,
                          timeout=300)
    assert chat.returncode == 0, chat.stderr
    messages: list[dict[str, str]] = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        messages.append({"role": "assistant", "content": generate(model, tokenizer, [messages], max_new_tokens=12)[0].text})
    assert chat.stdout == "".join(f"{m['content']}\n" for m in messages[1::2])
    assert messages[1]["content"] == tuned_answer
    wrong = thrifty("generate", "hi", "--model", str(tmp_path / "adapter"))
    assert wrong.returncode == 2 and "is a LoRA adapter" in wrong.stderr and "--adapter" in wrong.stderr


def test_generate_runs_a_gguf_from_its_blocks_or_dequantized() -> None:
    """The default: the file's own blocks; --dequantize: bf16 copies of its weights. Each
    answer is the library's on the same weights."""
    from thrifty.formats.loader import load_model
    from thrifty.generation.engine import generate

    prompt = "Write one sentence about the sea."
    for flags, quantize in (([], "gguf"), (["--dequantize"], None)):
        result = thrifty("generate", prompt, "--max-new-tokens", "24", "--no-stream", *flags)
        assert result.returncode == 0, result.stderr
        model, tokenizer = load_model(quantize=quantize)
        assert result.stdout == generate(model, tokenizer, prompt, max_new_tokens=24)[0].text + "\n", flags


def generated_text(capsys, *args: str) -> str:
    """`thrifty generate ...` in this process (the model loads each time, as in a new
    command); its answer text without the header lines."""
    from thrifty.cli import main

    assert main(["generate", *args, "--max-new-tokens", "24", "--no-stream"]) == 0
    out = capsys.readouterr().out
    return "\n".join(line for line in out.splitlines() if not line.startswith("=== "))


def test_generate_options_change_the_output_as_documented(capsys) -> None:
    """--seed makes sampling repeatable and a different seed samples differently,
    --temperature 0 is greedy whatever the seed, --system reaches the model, --stop cuts."""
    prompt = "Write one sentence about the sea."
    greedy = generated_text(capsys, prompt)
    assert generated_text(capsys, prompt, "--seed", "7") == greedy  # seeds do not touch greedy decoding
    sampled = [generated_text(capsys, prompt, "--temperature", "1.0", "--seed", str(seed)) for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2] and greedy not in sampled[:1] + sampled[2:]
    pirate = generated_text(capsys, prompt, "--system", "You are a pirate. Always say Arr.")
    assert pirate != greedy
    first_word = greedy.split()[2]
    assert first_word not in generated_text(capsys, prompt, "--stop", first_word)
