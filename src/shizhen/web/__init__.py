"""The consultation page served at `/`: one static file, no build step, no requests but to its own server."""
