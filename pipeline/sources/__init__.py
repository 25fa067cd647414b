"""Where images come from: a raw ImageNet tree, an image folder, the synthetic and learnable generators. Imports only pipeline.core."""
