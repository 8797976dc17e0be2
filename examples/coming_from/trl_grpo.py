"""TRL's GRPO quick start, run on Thrifty: only the import lines changed.

    was:  from trl import GRPOConfig, GRPOTrainer
          from peft import LoraConfig

Run: python examples/coming_from/trl_grpo.py [OUTPUT_DIR]   (~1 min on 2 cores)
Rewards completions near 20 characters long, on prompts of examples/data.
"""

import json
import os
import sys
from pathlib import Path

from datasets import Dataset

from thrifty import GRPOConfig, GRPOTrainer, LoraConfig

output_dir = sys.argv[1] if len(sys.argv) > 1 else "outputs/trl-style-grpo"
max_steps = int(os.environ.get("MAX_STEPS", "20"))

rows = [json.loads(line)["messages"] for line in (Path(__file__).parents[1] / "data" / "answer_style.jsonl").open()]
dataset = Dataset.from_list([{"prompt": [m[0]]} for m in rows])


def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion[0]["content"])) / 20 for completion in completions]


training_args = GRPOConfig(
    output_dir=output_dir,
    per_device_train_batch_size=8,
    gradient_accumulation_steps=2,
    num_generations=4,
    max_completion_length=32,
    learning_rate=1e-4,
    max_steps=max_steps,
    logging_steps=1,
    bf16=True,
    report_to="none",
    use_vllm=False,
)
trainer = GRPOTrainer(
    model="HuggingFaceTB/SmolLM2-135M-Instruct",
    reward_funcs=reward_len,
    args=training_args,
    train_dataset=dataset,
    peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
)
trainer.train()
