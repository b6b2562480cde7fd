"""Camera demo: EfficientNet-Lite0 fed NV12 frames, decoded and normalised by a static AIPP."""
