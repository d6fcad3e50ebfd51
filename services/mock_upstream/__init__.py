"""Mock upstream: an OpenAI-compatible fake provider with deterministic tokens and injectable failures."""
