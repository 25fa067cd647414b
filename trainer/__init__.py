"""kdpipe's trainer: models, distillation losses, the training loop, teacher caching and the CLI."""
