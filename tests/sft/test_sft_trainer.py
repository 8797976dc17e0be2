"""The SFT trainer: loss goes down, exact resume, crash-safe checkpoints, PEFT/transformers
interop of what it saves, the CLI, and the equivalences the loop relies on
(accumulation = big batch, activation checkpointing and packing change nothing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from thrifty.formats.hf_export import save_hf_model
from thrifty.formats.loader import load_model
from thrifty.sft.batches import collate_padded, pack_examples
from thrifty.sft.config import SFTConfig
from thrifty.sft.data import make_batch
from thrifty.sft.examples import tokenize_dataset
from thrifty.sft.trainer import SFTTrainer, sft_loss
from thrifty.training.checkpoint import list_checkpoints

from applied_steps import record_applied_steps
from tiny_tokenizer import save_tiny_model_dir, tiny_sft_rows

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DATA = REPO / "examples" / "data" / "answer_style.jsonl"
TIMING_KEYS = ("tokens_per_sec", "rss_mb")  # wall-clock measurements, not reproducible


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model_dir("llama", directory)
    return directory


def tiny_config(output_dir: Path, **overrides) -> SFTConfig:
    values = dict(output_dir=str(output_dir), max_length=96, per_device_train_batch_size=4, learning_rate=1e-2,
                  lora_r=4, lora_alpha=8, max_steps=6, logging_steps=1, save_steps=0, disable_tqdm=True,
                  num_sample_prompts=0, seed=3)
    values.update(overrides)
    return SFTConfig(**values)


def tiny_trainer(tiny_dir: Path, config: SFTConfig, dtype: str = "float32", rows: list[dict] | None = None,
                 eval_rows: list[dict] | None = None) -> SFTTrainer:
    model, tokenizer = load_model(tiny_dir, dtype=dtype, device="cpu")
    config.model_name_or_path = str(tiny_dir)
    return SFTTrainer(model, tokenizer, config, train_dataset=rows or tiny_sft_rows(), eval_dataset=eval_rows, log=quiet)


def training_records(output_dir: Path) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


# ---------------------------------------------------------------- a real run


def test_real_run_on_default_model_lowers_held_out_loss(tmp_path: Path) -> None:
    """A few LoRA steps on the shipped example data: held-out loss drops, and every
    artefact a run promises is there."""
    lines = EXAMPLE_DATA.read_text().splitlines()
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join(lines[:64]) + "\n")
    held_out.write_text("\n".join(lines[-12:]) + "\n")
    config = SFTConfig(train_file=str(train), eval_file=str(held_out), output_dir=str(tmp_path / "out"),
                       max_length=96, per_device_train_batch_size=8, per_device_eval_batch_size=12,
                       learning_rate=1e-3, max_steps=6, logging_steps=2, eval_on_start=True, save_steps=3,
                       disable_tqdm=True, num_sample_prompts=1, sample_max_new_tokens=6)
    model, tokenizer = load_model(None)
    log: list[str] = []
    result = SFTTrainer(model, tokenizer, config, log=log.append).train()

    assert result.eval_loss < 0.7 * result.initial_eval_loss, (result.initial_eval_loss, result.eval_loss)
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_sec", "rss_mb", "eval_loss"} <= set(records[-1])
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6"]
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) == 1 and samples[0]["before"] is not None and samples[0]["after"] is not None
    assert any("samples before training" in line for line in log)
    assert any("samples after training" in line for line in log)


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("method", ["lora", "full", "full_8bit"])
def test_resume_gives_identical_metrics(tiny_dir: Path, tmp_path: Path, method: str) -> None:
    """Train 6 steps saving every 2; resume from checkpoint-2 in a fresh trainer: the
    per-step loss, lr, grad norm and eval loss are bit-identical. LoRA runs with dropout
    (RNG restore), packing and accumulation; full runs in bf16 (fp32 master weights), with
    32-bit or 8-bit (byte-coded) AdamW moments."""
    options = dict(max_steps=6, save_steps=2, save_total_limit=None, eval_steps=3, warmup_steps=2,
                   lr_scheduler_type="cosine")
    if method == "lora":
        options.update(lora_dropout=0.1, packing=True, per_device_train_batch_size=2,
                       gradient_accumulation_steps=2)
        dtype = "float32"
    else:
        options.update(use_lora=False, learning_rate=1e-3, optim="adamw_8bit" if method == "full_8bit" else "adamw_torch")
        dtype = "bfloat16"
    out = tmp_path / "run"
    held_out = tiny_sft_rows(30)[24:]
    tiny_trainer(tiny_dir, tiny_config(out, **options), dtype, eval_rows=held_out).train()
    uninterrupted = training_records(out)
    final_weights = (out / ("adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"))
    expected_bytes = final_weights.read_bytes()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]

    final_weights.unlink()  # the resumed run must write it again, the same
    resumed = tiny_config(out, resume_from_checkpoint=str(out / "checkpoint-2"), **options)
    trainer = tiny_trainer(tiny_dir, resumed, dtype, eval_rows=held_out)
    applied = record_applied_steps(trainer)
    trainer.train()
    assert applied == [3, 4, 5, 6]  # continued from step 2: not restarted (same metrics either way)
    assert training_records(out) == uninterrupted
    assert final_weights.read_bytes() == expected_bytes
    assert len({r["loss"] for r in uninterrupted if "loss" in r}) > 1  # it did train


def test_resume_refuses_changed_settings(tiny_dir: Path, tmp_path: Path) -> None:
    from thrifty.errors import ThriftyError

    out = tmp_path / "run"
    tiny_trainer(tiny_dir, tiny_config(out, max_steps=2, save_steps=2)).train()
    changed = tiny_config(out, max_steps=4, save_steps=2, lora_r=8, resume_from_checkpoint="latest")
    with pytest.raises(ThriftyError, match=r"cannot resume with different settings \(lora_r: 4 -> 8\)"):
        tiny_trainer(tiny_dir, changed).train()


CRASH_SCRIPT = r"""
import os, sys, time, torch
sys.path[:0] = [{tests!r}, {tests_root!r}]
import thrifty.training.checkpoint as checkpoint
from test_sft_trainer import tiny_config, tiny_trainer
from pathlib import Path

real_save = torch.save
def slow_save(obj, path, *args, **kwargs):
    # While writing checkpoint-3 (its adapter is already on disk, the optimizer not yet):
    # tell the parent, then wait to be killed.
    if "checkpoint-3" in str(path):
        Path({marker!r}).write_text("saving")
        time.sleep(60)
    return real_save(obj, path, *args, **kwargs)
checkpoint.torch.save = slow_save
tiny_trainer(Path({tiny_dir!r}), tiny_config(Path({out!r}), max_steps=5, save_steps=1, save_total_limit=2)).train()
"""


def test_kill_during_save_leaves_the_previous_checkpoint_usable(tiny_dir: Path, tmp_path: Path) -> None:
    """SIGKILL a real training process in the middle of writing checkpoint-3: checkpoint-2
    stays complete, the half-written one is never taken for a checkpoint, and resuming
    from 'latest' finishes with exactly the metrics of an uninterrupted run."""
    reference = tmp_path / "reference"
    tiny_trainer(tiny_dir, tiny_config(reference, max_steps=5, save_steps=1, save_total_limit=2)).train()

    out, marker = tmp_path / "run", tmp_path / "saving"
    script = CRASH_SCRIPT.format(tests=str(Path(__file__).parent), tests_root=str(Path(__file__).parents[1]), marker=str(marker), tiny_dir=str(tiny_dir),
                                 out=str(out))
    child = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    deadline = time.time() + 120
    while not marker.exists():
        assert child.poll() is None, "the training process ended before reaching the save"
        assert time.time() < deadline, "the training process never reached checkpoint-3"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()

    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".tmp-checkpoint-3")]
    assert leftovers and (out / leftovers[0] / "adapter_model.safetensors").is_file()
    assert not (out / leftovers[0] / "optimizer.pt").exists()

    tiny_trainer(tiny_dir, tiny_config(out, max_steps=5, save_steps=1, save_total_limit=2,
                                       resume_from_checkpoint="latest")).train()
    # Compared to 1e-6, not bit for bit: in a few runs in a hundred (4 of 110 with a busy
    # CPU, 2026-12-06) one of the two runs (the killed one or, seen too, the uninterrupted
    # one) has step 2's grad_norm 0.57750130 instead of 0.57750094 (6e-7 relative; the loss
    # and the other steps equal). With one thread (OMP_NUM_THREADS=1) it was never seen
    # (0 of 70); MKL_DYNAMIC=FALSE and MKL_CBWR=AUTO,STRICT did not remove it. A wrong data
    # order, optimizer or RNG state changes the metrics by far more;
    # test_resume_gives_identical_metrics checks bit-identity within a process, and
    # test_resume_equals_uninterrupted_on_every_path for GRPO.
    resumed, uninterrupted = training_records(out), training_records(reference)
    assert len(resumed) == len(uninterrupted)
    for got, expected in zip(resumed, uninterrupted):
        assert got == pytest.approx(expected, rel=1e-6)
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-5"]


# ---------------------------------------------------------------- interop


def test_saved_adapter_loads_in_peft_with_the_same_logits(tiny_dir: Path, tmp_path: Path) -> None:
    import transformers
    from peft import PeftModel

    out = tmp_path / "run"
    trainer = tiny_trainer(tiny_dir, tiny_config(out, max_steps=4, use_rslora=True))
    trainer.train()
    ids = torch.tensor([[3, 26, 24, 10, 23, 43, 6, 7, 8, 4, 43, 3, 9, 10]])
    with torch.no_grad():
        ours = trainer.model(ids)
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
        before = base(ids).logits
        peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
        theirs = peft_model(ids).logits
    assert (ours - before).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_dir) and config["use_rslora"] is True


def thrifty_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thrifty.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_merge_cli_output_loads_in_transformers(tiny_dir: Path, tmp_path: Path) -> None:
    import transformers

    from thrifty.formats.peft_adapter import load_adapter

    out = tmp_path / "run"
    tiny_trainer(tiny_dir, tiny_config(out, max_steps=4)).train()
    merged = tmp_path / "merged"
    # No --model: the base comes from the adapter's base_model_name_or_path.
    done = thrifty_cli("merge", str(out / "adapter"), "--output", str(merged), "--dtype", "float32", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    model, _ = load_model(tiny_dir, dtype="float32", device="cpu")
    load_adapter(model, out / "adapter")
    ids = torch.tensor([[3, 26, 24, 10, 23, 43, 6, 7, 8, 4, 43, 3]])
    with torch.no_grad():
        expected = model(ids)
        hf = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        torch.testing.assert_close(hf(ids).logits, expected, rtol=1e-4, atol=1e-4)
        reloaded, tokenizer = load_model(merged, dtype="float32", device="cpu")
        torch.testing.assert_close(reloaded(ids), expected, rtol=1e-5, atol=1e-5)
    assert tokenizer.chat_template is not None


def test_save_hf_model_writes_tied_weights_once(tmp_path: Path) -> None:
    import transformers
    from safetensors import safe_open

    source = tmp_path / "tied"
    save_tiny_model_dir("llama-tied", source)
    model, tokenizer = load_model(source, dtype="float32", device="cpu")
    save_hf_model(model, tokenizer, tmp_path / "export")
    with safe_open(tmp_path / "export" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    generation = json.loads((tmp_path / "export" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 4]  # eos and the template's <|im_end|>
    ids = torch.tensor([[1, 5, 9, 20, 31]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- CLI errors


def test_cli_reports_bad_key_type_and_data_line(tiny_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": "e", \n')
    config = tmp_path / "sft.yaml"
    config.write_text(f"model_name_or_path: {tiny_dir}\ntrain_file: {data}\nmax_steps: 1\nlerning_rate: 0.1\n")
    done = thrifty_cli("sft", str(config), cwd=tmp_path)
    assert done.returncode != 0
    assert f"error: {config} line 4: unknown key 'lerning_rate' (did you mean 'learning_rate'?)" in done.stderr
    assert "Traceback" not in done.stderr

    config.write_text(f"model_name_or_path: {tiny_dir}\ntrain_file: {data}\nmax_steps: 1\n")
    done = thrifty_cli("sft", str(config), "max_steps=lots", cwd=tmp_path)
    assert done.returncode != 0 and "max_steps: expected a whole number" in done.stderr

    done = thrifty_cli("sft", str(config), f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"error: {data}: line 3: malformed JSON" in done.stderr


# ---------------------------------------------------------------- equivalences


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_equals_one_big_batch(tiny_dir: Path, tmp_path: Path) -> None:
    """2 micro-batches of 2 give the loss and gradients of one batch of 4, token-weighted
    (the micro-batches hold different numbers of labelled tokens)."""
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        config = tiny_config(tmp_path, use_lora=False, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation)
        trainer = tiny_trainer(tiny_dir, config)
        trainer.model.train()
        batches = trainer.micro_batches(trainer.order.next_batch())
        assert len(batches) == accumulation
        labels = [b.num_labels for b in batches]
        loss = trainer.accumulate_gradients(batches) / sum(labels)
        results.append((loss, _grads(trainer.model), labels))
    (loss_big, grads_big, _), (loss_acc, grads_acc, labels) = results
    assert labels[0] != labels[1]  # token weighting matters here
    assert abs(loss_big - loss_acc) < 1e-6
    assert grads_big.keys() == grads_acc.keys() and len(grads_big) > 10
    for name in grads_big:
        torch.testing.assert_close(grads_acc[name], grads_big[name], rtol=1e-5, atol=1e-7)


def test_activation_checkpointing_changes_nothing(tiny_dir: Path, tmp_path: Path) -> None:
    from thrifty.model.activation_checkpointing import enable_activation_checkpointing

    results = []
    for checkpointing in (False, True):
        trainer = tiny_trainer(tiny_dir, tiny_config(tmp_path, lora_dropout=0.2))
        if checkpointing:
            enable_activation_checkpointing(trainer.model)
        trainer.model.train()
        batch = trainer.data.train_batch(trainer.order.next_batch())
        torch.manual_seed(11)  # the same dropout masks (checkpointing replays them)
        loss = trainer.accumulate_gradients([batch])
        results.append((loss, _grads(trainer.model)))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    assert loss_plain == loss_ckpt
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-6, atol=1e-8)


def test_packing_gives_the_same_loss_as_padding(tiny_dir: Path) -> None:
    model, tokenizer = load_model(tiny_dir, dtype="float32", device="cpu")
    examples = tokenize_dataset(tiny_sft_rows(12), tokenizer, max_length=96)
    pad = tokenizer.pad_token_id
    padded = make_batch(examples, pad)
    packed_rows = pack_examples(examples, 160)
    assert 1 < len(packed_rows) < len(examples)
    packed = make_batch(packed_rows, pad)  # several packed rows, stacked and padded
    assert packed.num_labels == padded.num_labels and packed.num_tokens == padded.num_tokens
    # Padded batches train with plain causal attention (no mask); the explicit padding
    # mask of collate_padded must give the same loss and gradients.
    assert "mask" not in padded.tensors
    explicit_mask = collate_padded(examples, pad)
    results = []
    for tensors in (padded.tensors, packed.tensors, explicit_mask):
        model.zero_grad()
        loss, count = sft_loss(model, tensors)
        loss.backward()
        results.append((loss.item(), int(count), {n: p.grad.clone() for n, p in model.named_parameters()}))
    loss_a, count_a, grads_a = results[0]
    for loss_b, count_b, grads_b in results[1:]:
        assert count_a == count_b
        assert abs(loss_a - loss_b) < 1e-4 * abs(loss_a)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["qlora-nf4", "lora-int8", "full-checkpointing"])
def test_other_methods_learn_and_change_exactly_their_weights(tiny_dir: Path, tmp_path: Path, method: str) -> None:
    """Each method, bf16, on one fixed batch of 4 examples (every step the same batch): the
    loss falls below where it started, the adapters (or, in full fine-tuning, every
    weight) change, and nothing else does: not the quantized base, not a frozen weight."""
    options = {"qlora-nf4": dict(quantize="nf4"), "lora-int8": dict(quantize="int8"),
               "full-checkpointing": dict(use_lora=False, gradient_checkpointing=True, learning_rate=1e-3)}[method]
    trainer = tiny_trainer(tiny_dir, tiny_config(tmp_path, max_steps=8, **options), dtype="bfloat16",
                           rows=tiny_sft_rows(4))
    before = {name: t.clone() for name, t in trainer.model.state_dict().items()}
    result = trainer.train()
    losses = [r["loss"] for r in training_records(tmp_path)]
    # Measured: 4.57 -> 4.19 (LoRA r=4, the lr decaying to 0) and -> 3.85 (full); an update
    # that did nothing would leave the fixed batch's loss where it was.
    assert len(losses) == 8 and losses[-1] < 0.95 * losses[0], losses
    after = trainer.model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    if method == "full-checkpointing":
        assert changed == set(before)  # every weight trains (the tied head is the embedding)
    else:
        adapters = {name for name in before if "lora_" in name}
        assert adapters and changed <= adapters  # the quantized base and the norms stay as they were
        assert {n for n in changed if "lora_B" in n} == {n for n in adapters if "lora_B" in n}
        quantized = [n for n in before if n.endswith(("weight_int8", "scales", "weight_packed", "absmax"))]
        assert quantized and not changed & set(quantized)
    expected = "adapter/adapter_model.safetensors" if method != "full-checkpointing" else "model/model.safetensors"
    assert (tmp_path / expected).is_file() and result.output_path is not None