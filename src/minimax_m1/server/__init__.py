"""OpenAI-compatible HTTP front end: `minimax-m1 serve --model M` (see api.build_app)."""
