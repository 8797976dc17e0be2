"""An Unsloth SFT notebook, run on Thrifty: only the import lines changed.

    was:  from unsloth import FastLanguageModel, is_bf16_supported
          from trl import SFTConfig, SFTTrainer

Run: python examples/coming_from/unsloth_sft.py [OUTPUT_DIR]   (~1 min on 2 cores)
QLoRA on the default model, with the Alpaca prompt of Unsloth's notebooks over the
answer-style rows of examples/data; then a reply, a LoRA adapter and a q4_k_m GGUF.
"""

import json
import os
import sys
from pathlib import Path

from datasets import Dataset

from thrifty import FastLanguageModel, SFTConfig, SFTTrainer, is_bf16_supported

output_dir = sys.argv[1] if len(sys.argv) > 1 else "outputs/unsloth-style"
max_steps = int(os.environ.get("MAX_STEPS", "60"))
max_seq_length = 512

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name="unsloth/SmolLM2-135M-Instruct",
    max_seq_length=max_seq_length,
    dtype=None,
    load_in_4bit=True,
)
model = FastLanguageModel.get_peft_model(
    model,
    r=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    lora_alpha=16,
    lora_dropout=0,
    bias="none",
    use_gradient_checkpointing="unsloth",
    random_state=3407,
    use_rslora=False,
    loftq_config=None,
)

alpaca_prompt = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""
EOS_TOKEN = tokenizer.eos_token


def formatting_prompts_func(examples):
    texts = []
    for instruction, input, output in zip(examples["instruction"], examples["input"], examples["output"]):
        texts.append(alpaca_prompt.format(instruction, input, output) + EOS_TOKEN)
    return {"text": texts}


rows = [json.loads(line)["messages"] for line in (Path(__file__).parents[1] / "data" / "answer_style.jsonl").open()]
dataset = Dataset.from_list([{"instruction": m[0]["content"], "input": "", "output": m[1]["content"]} for m in rows])
dataset = dataset.map(formatting_prompts_func, batched=True)

trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    dataset_text_field="text",
    max_seq_length=max_seq_length,
    dataset_num_proc=2,
    packing=False,
    args=SFTConfig(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        warmup_steps=5,
        max_steps=max_steps,
        learning_rate=2e-4,
        fp16=not is_bf16_supported(),
        bf16=is_bf16_supported(),
        logging_steps=1,
        optim="adamw_8bit",
        weight_decay=0.01,
        lr_scheduler_type="linear",
        seed=3407,
        output_dir=output_dir,
        report_to="none",
    ),
)
trainer_stats = trainer.train()

FastLanguageModel.for_inference(model)
inputs = tokenizer([alpaca_prompt.format("What is 12 + 30?", "", "")], return_tensors="pt").to("cpu")
outputs = model.generate(**inputs, max_new_tokens=16, use_cache=True)
print(tokenizer.batch_decode(outputs)[0])

model.save_pretrained(f"{output_dir}/lora_model")
tokenizer.save_pretrained(f"{output_dir}/lora_model")
model.save_pretrained_gguf(f"{output_dir}/model", tokenizer, quantization_method="q4_k_m")
