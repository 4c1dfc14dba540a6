"""Analyses of a trained model beyond task scores: heads.py measures how far each attention
head reaches next to its RoPE base (CLI: tools/analyze_heads.py)."""
