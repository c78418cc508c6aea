"""`kbit serve`: an OpenAI-compatible HTTP server over a continuous-batching scheduler."""
