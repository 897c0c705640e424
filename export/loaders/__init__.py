"""Readers of text checkpoints, one module per source format: Hugging Face folders (`hf`), Meta
folders (`meta`) and GGUF files (`gguf_file`). Each returns a `Checkpoint` under canonical tensor
names; export/registry.py says which reader a path needs (`load_checkpoint`).
"""
