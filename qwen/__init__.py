"""The Qwen (v1) architecture for transformers 5 (Auto-class registration lands with the model modules)."""
