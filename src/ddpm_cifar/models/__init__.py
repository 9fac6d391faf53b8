"""The denoising networks (they know nothing about noise), and checkpoints that carry their config."""
