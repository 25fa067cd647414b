"""The commands' jobs: train, cache-teacher, export, the demo and its teacher recipe."""
