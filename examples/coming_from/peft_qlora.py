"""transformers + bitsandbytes + PEFT QLoRA with a plain PyTorch loop, run on Thrifty:
only the import lines changed.

    was:  from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
          from peft import LoraConfig, get_peft_model

Run: python examples/coming_from/peft_qlora.py [OUTPUT_DIR]   (~30 s on 2 cores)
Prints each step's loss as JSON, then saves the adapter (PEFT's format).
"""

import json
import os
import sys

import torch

from thrifty import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LoraConfig, get_peft_model

output_dir = sys.argv[1] if len(sys.argv) > 1 else "outputs/peft-qlora"
max_steps = int(os.environ.get("MAX_STEPS", "10"))
model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"

bnb_config = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16,
)
model = AutoModelForCausalLM.from_pretrained(model_id, quantization_config=bnb_config, device_map="auto")
tokenizer = AutoTokenizer.from_pretrained(model_id)
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token

config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, bias="none",
                    task_type="CAUSAL_LM")
torch.manual_seed(0)  # reproducible adapter initialisation
model = get_peft_model(model, config)
model.print_trainable_parameters()

texts = [f"Question: what is {a} plus {b}? Answer: {a + b}." for a in range(8) for b in range(4)]
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
model.train()
for step in range(max_steps):
    batch = tokenizer(texts[4 * step % len(texts):][:4], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    outputs = model(**batch, labels=labels)
    outputs.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(json.dumps({"step": step + 1, "loss": outputs.loss.item()}), flush=True)

model.save_pretrained(output_dir)
