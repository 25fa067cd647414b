"""The teacher cache: the Zarr store (writer and reader), its checks and its fingerprint. Imports only pipeline.core."""
