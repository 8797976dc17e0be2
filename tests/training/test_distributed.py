"""Under torchrun (real torchrun, gloo, two processes on this machine): N processes compute
what one process computes with the same global batch (SFT and GRPO, per-step metrics and
final weights), on one node or two simulated nodes; a run resumes with another number of
processes; rank 0 alone writes; a failing rank stops the job with its message."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_tokenizer import save_tiny_model_dir, tiny_sft_rows
from weight_updates import COMPARED_ADAM_EPSILON, assert_same_updates

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "distributed_script.py"
REPO = HERE.parents[1]
TIMING_KEYS = ("tokens_per_sec", "rss_mb", "time/generation", "time/scoring", "time/training", "time/step")
TIMEOUT = 300


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama-ddp")
    save_tiny_model_dir("llama", directory)
    return directory


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(HERE.parent), env.get("PYTHONPATH", "")])
    return env


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def run(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=TIMEOUT, cwd=REPO)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command[:6])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def spec(kind: str, model: Path, **config: object) -> str:
    return json.dumps({"kind": kind, "model": str(model), "config": config})


def one_process(kind: str, model: Path, **config: object) -> subprocess.CompletedProcess:
    return run([sys.executable, str(SCRIPT), spec(kind, model, **config)])


def two_processes(kind: str, model: Path, **config: object) -> subprocess.CompletedProcess:
    return run(torchrun("--standalone", "--nproc-per-node", "2", str(SCRIPT), spec(kind, model, **config)))


def metrics(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    adapter = output_dir / "adapter" / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else output_dir / "model" / "model.safetensors"))


def assert_same_run(single: Path, multi: Path, settings: dict) -> None:
    """Per-step metrics and final weights of two runs equal to float32 tolerance: the
    ranks' sums are added in another order than one process adds them."""
    a, b = metrics(single), metrics(multi)
    assert len(a) == len(b) >= 2  # every step logged once, by rank 0 alone
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    assert_same_updates(weights(multi), weights(single), steps=settings["max_steps"],
                        learning_rate=settings["learning_rate"])


SFT = dict(max_steps=4, learning_rate=1e-2, lora_r=4, lora_alpha=8, logging_steps=1, num_sample_prompts=0, seed=3,
           max_length=96, eval_split=0.2, eval_steps=2, save_steps=2, adam_epsilon=COMPARED_ADAM_EPSILON)


@pytest.mark.parametrize("method", ["lora", "full_accumulation", "qlora_packing"])
def test_sft_two_processes_equal_one(tiny_dir: Path, tmp_path: Path, method: str) -> None:
    settings = {"lora": dict(per_device_train_batch_size=2),
                "full_accumulation": dict(per_device_train_batch_size=1, gradient_accumulation_steps=2,
                                          use_lora=False, learning_rate=1e-3),
                "qlora_packing": dict(per_device_train_batch_size=1, quantize="nf4", packing=True)}[method]
    per_device = settings.pop("per_device_train_batch_size")
    settings = {**SFT, **settings}
    one_process("sft", tiny_dir, **settings, per_device_train_batch_size=2 * per_device,
                output_dir=str(tmp_path / "one"))
    two_processes("sft", tiny_dir, **settings, per_device_train_batch_size=per_device,
                  output_dir=str(tmp_path / "two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", settings)
    assert any("eval_loss" in r for r in metrics(tmp_path / "two"))
    # Rank 0 wrote the checkpoint with both ranks' RNG states, and nothing else was written.
    assert (tmp_path / "two" / "checkpoint-2" / "rng_state_1.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_fsdp2_shards_full_fine_tuning_and_computes_what_one_process_does(tiny_dir: Path, tmp_path: Path) -> None:
    """fsdp: full_shard under torchrun: the same run as one process, each rank holding
    about half of the parameters and AdamW state, and its checkpoint (whole files)
    resumed by one process continues the same run."""
    settings = dict(SFT, use_lora=False, learning_rate=1e-3)
    one_process("sft", tiny_dir, **settings, per_device_train_batch_size=4, output_dir=str(tmp_path / "one"))
    run(torchrun("--standalone", "--nproc-per-node", "2", str(SCRIPT), json.dumps(
        {"kind": "sft", "model": str(tiny_dir), "report": True,
         "config": dict(settings, per_device_train_batch_size=2, fsdp="full_shard", output_dir=str(tmp_path / "two"))})))
    assert_same_run(tmp_path / "one", tmp_path / "two", settings)
    run([sys.executable, str(SCRIPT), json.dumps({"kind": "sft", "model": str(tiny_dir), "report": True, "config": dict(
        settings, per_device_train_batch_size=4, max_steps=1, output_dir=str(tmp_path / "unsharded"))})])
    whole = json.loads((tmp_path / "unsharded" / "rank0.json").read_text())
    for rank in (0, 1):
        held = json.loads((tmp_path / "two" / f"rank{rank}.json").read_text())
        for kind in ("parameters", "optimizer"):  # dim-0 shards: up to one row each more than half
            assert 0.45 < held[kind] / whole[kind] < 0.55, (rank, kind, held[kind], whole[kind])
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "two" / "checkpoint-2", resumed / "checkpoint-2")
    one_process("sft", tiny_dir, **settings, per_device_train_batch_size=4, output_dir=str(resumed),
                resume_from_checkpoint="latest")
    assert_same_updates(weights(resumed), weights(tmp_path / "one"), steps=settings["max_steps"],
                        learning_rate=settings["learning_rate"])


def test_fsdp2_no_gradient_forwards_see_the_current_weights(tiny_dir: Path) -> None:
    """FSDP2 refills each unsharded weight in place without a new version, often at the
    same address: a no-gradient forward (eval) must not reuse a fused copy of last step's
    weights. Each eval loss equals the next training step's loss on the same batch (with a
    stale copy they were up to 4e-3 apart)."""
    done = run(torchrun("--standalone", "--nproc-per-node", "2", str(HERE / "sharded_eval_script.py"),
                        str(tiny_dir), "30"))
    reports = json.loads(done.stdout.splitlines()[-1])
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for report in reports:
        assert report["worst"] < 1e-5, report


GRPO = dict(max_steps=4, num_generations=4, gradient_accumulation_steps=2, max_completion_length=8,
            learning_rate=1e-2, lora_r=4, lora_alpha=8, save_steps=0, seed=5,
            adam_epsilon=COMPARED_ADAM_EPSILON)


@pytest.mark.parametrize("variant", ["bnpo_batch_scaled", "dapo_dynamic_sampling", "grpo_kl_two_iterations"])
def test_grpo_two_processes_equal_one(tiny_dir: Path, tmp_path: Path, variant: str) -> None:
    """Each rank samples half the prompts; the completions, rewards, losses and weights are
    those of one process sampling all of them (per-completion seeds)."""
    settings = {"bnpo_batch_scaled": dict(loss_type="bnpo", scale_rewards="batch"),
                "dapo_dynamic_sampling": dict(loss_type="dapo", dynamic_sampling=True, num_generations=2),
                "grpo_kl_two_iterations": dict(loss_type="grpo", beta=0.1, num_iterations=2, use_lora=False,
                                               learning_rate=1e-3)}[variant]
    one_process("grpo", tiny_dir, **{**GRPO, **settings}, per_device_train_batch_size=8,
                output_dir=str(tmp_path / "one"))
    two_processes("grpo", tiny_dir, **{**GRPO, **settings}, per_device_train_batch_size=4,
                  output_dir=str(tmp_path / "two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", {**GRPO, **settings})
    completions = [(tmp_path / d / "completions.jsonl").read_text() for d in ("one", "two")]
    assert completions[0] == completions[1]  # the same samples, logged once
    if variant == "dapo_dynamic_sampling":
        assert any(r["dynamic_sampling/discarded_groups"] > 0 for r in metrics(tmp_path / "two"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_through_the_cli_equal_one_process(tiny_dir: Path, tmp_path: Path) -> None:
    """`torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT -m thrifty sft CONFIG`,
    two launches meeting at a localhost rendezvous as two machines would."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in tiny_sft_rows(40)))
    config = tmp_path / "sft.yaml"
    config.write_text(f"model_name_or_path: {tiny_dir}\ndtype: float32\ntrain_file: {data}\ndisable_tqdm: true\n"
                      + "".join(f"{k}: {v}\n" for k, v in SFT.items()))
    one = run([sys.executable, "-m", "thrifty", "sft", str(config), "per_device_train_batch_size=4",
               f"output_dir={tmp_path / 'one'}"])
    port = free_port()
    launches = [subprocess.Popen(
        torchrun("--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "thrifty-test", "-m", "thrifty", "sft",
                 str(config), "per_device_train_batch_size=2", f"output_dir={tmp_path / 'two'}"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(), cwd=REPO) for node in (0, 1)]
    outputs = [launch.communicate(timeout=TIMEOUT) for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "x 2 processes" in outputs[0][0] + outputs[1][0]
    printed = outputs[0][0] + outputs[1][0]
    assert one.stdout.count("done:") == 1 and printed.count("done:") == printed.count("next:") == 1  # rank 0 prints
    assert_same_run(tmp_path / "one", tmp_path / "two", SFT)


def test_resume_with_another_number_of_processes(tiny_dir: Path, tmp_path: Path) -> None:
    """Saved by 2 processes at step 2, resumed by 1 (twice the accumulation, the same global
    batch): the same run as one process that never stopped, checked in separate directories;
    and resumed by 2 again: the 2-process run that never stopped."""
    settings = dict(SFT, eval_split=0.0, eval_steps=None)
    one_process("sft", tiny_dir, **settings, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                output_dir=str(tmp_path / "uninterrupted"))
    two_processes("sft", tiny_dir, **settings, per_device_train_batch_size=2, output_dir=str(tmp_path / "two"))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "two" / "checkpoint-2", resumed / "checkpoint-2")
    one_process("sft", tiny_dir, **settings, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                output_dir=str(resumed), resume_from_checkpoint="latest")
    assert_same_updates(weights(resumed), weights(tmp_path / "uninterrupted"), steps=settings["max_steps"],
                        learning_rate=settings["learning_rate"])
    assert metrics(resumed)[-1]["loss"] == pytest.approx(metrics(tmp_path / "uninterrupted")[-1]["loss"], rel=1e-4)
    # With the same number of processes, the resumed run is the uninterrupted one to the
    # bound tests/sft/test_sft_trainer.py documents for runs in separate processes (a
    # multi-threaded float32 sum can differ in its last bit with a busy CPU: 6e-7 relative
    # in a grad_norm, a few runs in a hundred). A wrong data order, optimizer or RNG state
    # after the resume changes the metrics by far more.
    again = tmp_path / "again"
    again.mkdir()
    shutil.copytree(tmp_path / "two" / "checkpoint-2", again / "checkpoint-2")
    two_processes("sft", tiny_dir, **settings, per_device_train_batch_size=2, output_dir=str(again),
                  resume_from_checkpoint="latest")
    expected = [r for r in metrics(tmp_path / "two") if r["step"] > 2]
    assert [r["step"] for r in metrics(again)] == [r["step"] for r in expected]
    for got, want in zip(metrics(again), expected):
        assert got == pytest.approx(want, rel=1e-6)
    assert_same_updates(weights(again), weights(tmp_path / "two"), steps=settings["max_steps"] - 2,
                        learning_rate=settings["learning_rate"])
    # Another global batch cannot continue the same run: refused, naming the product to keep.
    refused = run([sys.executable, str(SCRIPT), spec("sft", tiny_dir, **{**settings, "max_steps": 6},
                                                     per_device_train_batch_size=2, output_dir=str(resumed),
                                                     resume_from_checkpoint="latest")], check=False)
    assert refused.returncode == 2 and "examples per optimizer step" in refused.stderr


def test_a_failing_rank_stops_every_rank_with_its_message(tiny_dir: Path, tmp_path: Path) -> None:
    """Rank 1's reward function raises while rank 0 waits for its completions: the job
    ends (no hang) and the message reaches the terminal."""
    started = time.monotonic()
    done = run(torchrun("--standalone", "--nproc-per-node", "2", str(SCRIPT),
                        json.dumps({"kind": "grpo", "model": str(tiny_dir), "fail_on_rank": 1,
                                    "config": dict(GRPO, per_device_train_batch_size=4,
                                                   output_dir=str(tmp_path / "out"))})), check=False)
    assert done.returncode != 0
    assert "vowel_share failed on purpose" in done.stderr
    assert time.monotonic() - started < 120
    assert not (tmp_path / "out" / "adapter").exists()


def test_a_rank_that_loses_its_peer_says_so_in_one_line() -> None:
    """The real gloo error of a collective whose peer died is recognised as such (a
    RuntimeError naming a closed connection), and the line says where the message is."""
    done = run(torchrun("--standalone", "--nproc-per-node", "2", str(HERE / "peer_failure_script.py")), check=False)
    assert done.returncode != 0
    assert "classified: True" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "error (rank 1): stopped because another process of this torchrun job stopped" in done.stdout


def test_torchrun_cli_ends_with_the_failing_ranks_message(tiny_dir: Path, tmp_path: Path) -> None:
    """`torchrun -m thrifty sft` into an output_dir another run holds: rank 0 refuses it,
    rank 1 prints no gloo traceback (it is stopped, or says in one line why), and
    torchrun's closing summary names rank 0's message as the root cause instead of
    "To enable traceback see ..."."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "f.write('pid 4242'); f.flush(); print('held', flush=True); time.sleep(120)"),
        str(out / ".thrifty-run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        config = tmp_path / "sft.yaml"
        config.write_text(json.dumps(dict(SFT, model_name_or_path=str(tiny_dir), dtype="float32",
                                          output_dir=str(out), disable_tqdm=True)))
        done = run(torchrun("--standalone", "--nproc-per-node", "2", "-m", "thrifty", "sft", str(config)),
                   check=False)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode != 0
    message = f"error (rank 0): output_dir {out} is in use by another training run (pid 4242)"
    assert message in done.stderr
    assert "Connection closed by peer" not in done.stderr and 'thrifty/training' not in done.stderr
    root_cause = done.stderr.split("Root Cause")[-1]
    assert "traceback : " + message in root_cause, done.stderr[-2000:]
