"""What an operator sees: Prometheus metrics, one structured log line per request, request ids."""
