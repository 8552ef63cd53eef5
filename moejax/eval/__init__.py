"""Accuracy of offloaded decoding against the resident model."""
