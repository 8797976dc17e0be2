"""The names people's code already uses (Unsloth, TRL, PEFT, transformers), mapped onto
Thrifty's own API, so that code runs with its import lines changed.

    from thrifty import FastLanguageModel, SFTTrainer, SFTConfig        # was: unsloth, trl
    from thrifty import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from thrifty import LoraConfig, get_peft_model                      # was: peft

Each name behaves as the original where Thrifty can do the same thing, and fails with a
ThriftyError naming the argument where it cannot (never a bare TypeError). The layer is
thin: the models, tokenizers and trainers underneath are Thrifty's own.
"""
