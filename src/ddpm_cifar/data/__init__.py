"""CIFAR-10 from the official archive or an image folder, read safely, stored as uint8 arrays."""
