"""The inference engine: loading, prompt building, sampling and the decode loop. Knows nothing of HTTP."""
