"""kdpipe's data library: ImageNet-100 shards, replayable augmentation, fast loaders, teacher cache.

Usable on its own; never imports `trainer`.
"""
__version__ = "0.1.0"
