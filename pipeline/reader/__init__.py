"""Reading shards: manifest and index (local or behind a URL), streams, the loader and its backends. Never imports the writer (pipeline.shards)."""
