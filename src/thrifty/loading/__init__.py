"""Loading models and tokenizers from Hugging Face directories and GGUF files."""
