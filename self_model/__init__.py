"""Config-driven LLM training toolkit."""
