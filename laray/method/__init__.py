"""The method: the VGG SegNet-style auto-encoder, Local Aggregation's memory bank and loss, k-means, weights."""
