"""Layer 4, using a trained run live: the OpenAI-compatible API (request schema and limits, the
generation engine, the HTTP app and its guards, the server) and the terminal chat."""
