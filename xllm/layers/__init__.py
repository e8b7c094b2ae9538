"""Shared building blocks the model files compose."""
