"""The small shared core: errors, atomic writes, locks, names, processes, digests, batches, augmentation parameters, class lists, output directories, URLs. Imports nothing else of kdpipe."""
