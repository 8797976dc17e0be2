"""What every training run shares (training/run.py), tested on real runs of a tiny model:
one run per output_dir (a real second process holds it), no fresh run over another run's
checkpoints, divergence stops the run before anything non-finite is saved, a full disk
says so and keeps the last checkpoint, reward functions that score nothing stop GRPO."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from thrifty.errors import ThriftyError
from thrifty.formats.hf_export import save_hf_model
from thrifty.formats.loader import load_model
from thrifty.formats.peft_adapter import load_adapter
from thrifty.grpo.config import GRPOConfig
from thrifty.grpo.trainer import GRPOTrainer
from thrifty.sft.config import SFTConfig
from thrifty.sft.trainer import SFTTrainer
from thrifty.training.checkpoint import list_checkpoints

from tiny_tokenizer import save_tiny_model_dir

ROWS = [{"prompt": f"say {w}", "completion": w} for w in ["red", "blue", "green", "one", "two", "sun", "moon"] * 2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama-run")
    save_tiny_model_dir("llama", directory)
    return directory


def sft(tiny_dir: Path, output_dir: Path, log: list[str] | None = None, **overrides: object) -> SFTTrainer:
    values: dict = dict(model_name_or_path=str(tiny_dir), dtype="float32", output_dir=str(output_dir), max_length=64,
                        per_device_train_batch_size=4, learning_rate=1e-2, lora_r=4, lora_alpha=8, max_steps=3,
                        logging_steps=1, save_steps=1, disable_tqdm=True, num_sample_prompts=0, seed=3)
    values.update(overrides)
    model, tokenizer = load_model(tiny_dir, dtype="float32", device="cpu")
    return SFTTrainer(model, tokenizer, SFTConfig(**values), train_dataset=ROWS,
                      log=(log.append if log is not None else lambda _: None))


def test_a_second_run_into_the_same_output_dir_stops_at_once(tiny_dir: Path, tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from thrifty.training.run import "
         "_lock_directory; lock = _lock_directory(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ThriftyError, match=rf"{tmp_path} is in use by another training run \(pid {holder.pid}\)"):
            sft(tiny_dir, tmp_path).train()
        assert not list_checkpoints(tmp_path)  # it wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder: its lock goes with it
        holder.wait()
    result = sft(tiny_dir, tmp_path).train()
    assert result.global_step == 3


def test_a_fresh_run_never_mixes_with_an_old_runs_checkpoints(tiny_dir: Path, tmp_path: Path) -> None:
    sft(tiny_dir, tmp_path).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    with pytest.raises(ThriftyError, match=r"holds another run's checkpoints \(checkpoint-2, checkpoint-3\).*"
                                           r"resume_from_checkpoint: latest.*overwrite_output_dir: true"):
        sft(tiny_dir, tmp_path, max_steps=1).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]  # untouched
    sft(tiny_dir, tmp_path, max_steps=1, overwrite_output_dir=True).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]  # the old run's are gone


def test_a_finished_runs_results_are_not_replaced_without_overwrite(tiny_dir: Path, tmp_path: Path) -> None:
    """A run without checkpoints (save_steps: 0) leaves only results: a second run into its
    output_dir is refused, from Python and from the CLI before the model loads (no memory
    plan printed), and the results are untouched; overwrite_output_dir replaces them all."""
    sft(tiny_dir, tmp_path, save_steps=0, max_steps=2).train()
    assert not list_checkpoints(tmp_path)
    before = {name: (tmp_path / name).read_bytes()
              for name in ("metrics.jsonl", "adapter/adapter_model.safetensors", "adapter/adapter_config.json")}
    with pytest.raises(ThriftyError, match=rf"output_dir {tmp_path} holds a finished run's results \(adapter, "
                                           r"metrics.jsonl.*overwrite_output_dir: true"):
        sft(tiny_dir, tmp_path, save_steps=0, max_steps=1).train()
    config = tmp_path.parent / f"{tmp_path.name}.yaml"
    config.write_text(f"model_name_or_path: {tiny_dir}\noutput_dir: {tmp_path}\ndtype: float32\n")
    cli = subprocess.run([sys.executable, "-m", "thrifty", "sft", str(config), "max_steps=1"],
                         capture_output=True, text=True)
    assert cli.returncode != 0 and "holds a finished run's results (adapter, metrics.jsonl" in cli.stderr
    assert "predicted peak RSS" not in cli.stdout and "Traceback" not in cli.stderr
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    sft(tiny_dir, tmp_path, save_steps=0, max_steps=1, overwrite_output_dir=True).train()
    steps = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 1  # the new run's one step, nothing of the old run's two
    assert (tmp_path / "adapter/adapter_model.safetensors").read_bytes() != before["adapter/adapter_model.safetensors"]


def test_resuming_with_changed_settings_says_what_changed(tiny_dir: Path, tmp_path: Path) -> None:
    sft(tiny_dir, tmp_path, max_steps=2).train()
    log: list[str] = []
    sft(tiny_dir, tmp_path, log, max_steps=3, learning_rate=5e-3, resume_from_checkpoint="latest").train()
    (notice,) = [line for line in log if "changed settings" in line]
    assert "learning_rate: 0.01 -> 0.005" in notice and "max_steps: 2 -> 3" in notice


def test_divergence_stops_the_run_and_nothing_non_finite_is_saved(tiny_dir: Path, tmp_path: Path) -> None:
    trainer = sft(tiny_dir, tmp_path, learning_rate=1e30, max_steps=6, save_total_limit=None)
    with pytest.raises(ThriftyError, match=r"step (\d+): the gradients are (nan|inf).*Last good checkpoint: .*"
                                           r"checkpoint-\d+.*Lower learning_rate \(now 1e\+30\)"):
        trainer.train()
    assert trainer.step < 6 and not (tmp_path / "adapter").exists()
    saved = list_checkpoints(tmp_path)
    assert saved  # the steps before the divergence
    for checkpoint in saved:
        for name, tensor in load_file(checkpoint / "adapter_model.safetensors").items():
            assert torch.isfinite(tensor).all(), (checkpoint, name)
    # The refused update left the weights as they were: finite.
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_a_collapsed_run_stops_naming_the_step_and_the_cause(tiny_dir: Path, tmp_path: Path) -> None:
    """learning_rate 1e6 diverges finitely: after one update the softmax saturates, the
    loss sits at ln(vocab) and every gradient is exactly zero. The run stops after
    max_zero_gradient_steps such steps instead of ending "done" with a dead adapter."""
    trainer = sft(tiny_dir, tmp_path, learning_rate=1e6, max_steps=12, save_total_limit=None)
    with pytest.raises(ThriftyError, match=r"step 6: the gradients have been exactly zero for 5 steps in a row: the "
                                           r"model collapsed at step 1 .*ln\(vocabulary\) = 4\.575.*Last good "
                                           r"checkpoint: none\. Lower learning_rate \(now 1e\+06\)"):
        trainer.train()
    assert not (tmp_path / "adapter").exists()  # no collapsed result
    sft(tiny_dir, tmp_path / "unchecked", learning_rate=1e6, max_steps=8, max_zero_gradient_steps=0).train()


def constant_reward(completions, **kwargs) -> list[float]:  # type: ignore[no-untyped-def]
    return [1.0 for _ in completions]


def test_grpo_steps_with_nothing_to_teach_are_not_a_collapse(tiny_dir: Path, tmp_path: Path) -> None:
    """Equal rewards in every group: zero advantages, zero gradients for every step, and
    no collapse (the check counts only steps whose advantages are not all zero)."""
    model, tokenizer = load_model(tiny_dir, dtype="float32", device="cpu")
    config = GRPOConfig(model_name_or_path=str(tiny_dir), dtype="float32", output_dir=str(tmp_path), max_steps=7,
                        num_generations=2, per_device_train_batch_size=4, max_completion_length=4, save_steps=0,
                        disable_tqdm=True, num_eval_samples=0, max_zero_gradient_steps=2)
    GRPOTrainer(model, tokenizer, reward_funcs=[constant_reward], train_dataset=ROWS, config=config,
                log=lambda _: None).train()
    norms = [json.loads(line)["grad_norm"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "grad_norm" in line]
    assert len(norms) == 7 and all(norm == 0.0 for norm in norms)


def test_non_finite_weights_are_never_written(tiny_dir: Path, tmp_path: Path) -> None:
    trainer = sft(tiny_dir, tmp_path, max_steps=1)
    trainer.train()
    with torch.no_grad():
        next(p for name, p in trainer.model.named_parameters() if "lora_B" in name)[0, 0] = float("inf")
    with pytest.raises(ThriftyError, match=r"adapter_model\.safetensors: not written, 1 of \d+ tensors hold NaN or "
                                           r"infinite.*lower learning_rate"):
        trainer.run.save_model()
    model, tokenizer = load_model(tiny_dir, dtype="float32", device="cpu")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[1, 2] = float("nan")
    with pytest.raises(ThriftyError, match=r"model\.safetensors: not written, 1 of \d+ tensors.*up_proj"):
        save_hf_model(model, tokenizer, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_an_adapter_with_nan_weights_is_refused_when_loaded(tiny_dir: Path, tmp_path: Path) -> None:
    trainer = sft(tiny_dir, tmp_path, max_steps=1)
    trainer.train()
    adapter = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(adapter)
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(tensors, str(adapter))
    model, _ = load_model(tiny_dir, dtype="float32", device="cpu")
    with pytest.raises(ThriftyError, match=rf"adapter_model\.safetensors: 1 of {len(tensors)} tensors hold NaN"):
        load_adapter(model, tmp_path / "adapter")


@contextlib.contextmanager
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on a real 4 MB tmpfs (this needs root, as on our machines and CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a full disk needs a small tmpfs, which only root can mount; not tested here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_says_so_and_keeps_the_last_checkpoint(tiny_dir: Path, tmp_path: Path) -> None:
    with small_disk(tmp_path) as disk:
        trainer = sft(tiny_dir, disk / "run", max_steps=1)
        trainer.train()
        state = {"step": 1}
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 8192))  # full but for a few KB
        with pytest.raises(ThriftyError, match=r"checkpoint-2: not written, the disk is full"):
            trainer.run.save_checkpoint(2, state)
        assert [p.name for p in list_checkpoints(disk / "run")] == ["checkpoint-1"]
        assert not [p for p in (disk / "run").iterdir() if p.name.startswith(".tmp-")]  # nothing half-written
        model, tokenizer = load_model(tiny_dir, dtype="float32", device="cpu")
        again = SFTTrainer(model, tokenizer, SFTConfig(**{**trainer.config.__dict__, "max_steps": 2,
                                                          "resume_from_checkpoint": "latest"}),
                           train_dataset=ROWS, log=lambda _: None)
        (disk / "filler").unlink()
        assert again.train().global_step == 2  # the kept checkpoint resumes


def test_output_dir_that_is_a_file_or_read_only(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ThriftyError, match=r"output_dir .*taken is a file"):
        sft(tiny_dir, tmp_path / "taken").train()
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if os.access(read_only, os.W_OK):  # root ignores permissions: a read-only bind mount instead
            if subprocess.run(["mount", "--bind", "-o", "ro", str(read_only), str(read_only)],
                              capture_output=True).returncode != 0:
                pytest.skip("cannot make a read-only directory here")
            subprocess.run(["mount", "-o", "remount,ro,bind", str(read_only)], check=True)
        with pytest.raises(ThriftyError, match=r"output_dir .*ro.* (not writable|cannot be created)"):
            sft(tiny_dir, read_only / "run").train()
    finally:
        subprocess.run(["umount", str(read_only)], capture_output=True)
        read_only.chmod(0o700)


def never_applies(completions, **kwargs) -> list[None]:  # type: ignore[no-untyped-def]
    return [None for _ in completions]


def test_grpo_stops_when_a_reward_function_scores_nothing(tiny_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model(tiny_dir, dtype="float32", device="cpu")
    config = GRPOConfig(model_name_or_path=str(tiny_dir), dtype="float32", output_dir=str(tmp_path), max_steps=2,
                        num_generations=2, per_device_train_batch_size=4, max_completion_length=4, save_steps=0,
                        disable_tqdm=True, num_eval_samples=0)
    trainer = GRPOTrainer(model, tokenizer, reward_funcs=[never_applies], train_dataset=ROWS, config=config,
                          log=lambda _: None)
    with pytest.raises(ThriftyError, match=r"step 1: reward function 'never_applies' gave no usable value .* 4 "
                                           r"completions"):
        trainer.train()
    assert not (tmp_path / "adapter").exists()
