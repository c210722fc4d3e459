"""Token-level LoRA finetuning co-served with inference."""
