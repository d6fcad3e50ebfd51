"""Proxy: authenticate, admit, route and forward OpenAI-compatible calls; emit one usage event each."""
