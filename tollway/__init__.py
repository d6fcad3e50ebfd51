"""Tollway runtime: the CLI, the bundled broker, and `tollway up` wiring the three services together."""
