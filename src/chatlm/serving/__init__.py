"""The OpenAI-compatible server: `engine` (continuous batching), `protocol` (requests in, responses out),
`app` (the HTTP endpoints)."""
