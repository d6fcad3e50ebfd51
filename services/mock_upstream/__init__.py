"""Mock upstream: a fake provider speaking OpenAI chat/embeddings, the OpenAI Responses API and Anthropic's
Messages API, with deterministic tokens in every usage dimension and injectable failures."""
