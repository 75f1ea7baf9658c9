"""Adapters that put epikern's EU into other decoders (HF transformers, vLLM)."""
