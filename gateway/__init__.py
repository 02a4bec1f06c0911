"""Gateway: the internal moderation API. The only package that knows prompts and serving.

`gateway.api` holds the HTTP adapters, `gateway.moderation` the one moderation path,
`gateway.bootstrap` the composition root; `gateway.cli` (the command line) and
`gateway.quality` (the offline tool-chain) are separate programs the server never imports."""
