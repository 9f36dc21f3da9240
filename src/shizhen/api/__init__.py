"""The HTTP layer: a FastAPI app over the chat service. Knows nothing of torch."""
