"""Evaluations of trained models: passkey retrieval over (context length x needle depth)."""
