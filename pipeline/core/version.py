"""kdpipe's version: written into manifests and cache fingerprints."""
__version__ = "0.1.0"
