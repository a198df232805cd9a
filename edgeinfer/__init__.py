"""edgeinfer: an on-device LLM runtime."""
