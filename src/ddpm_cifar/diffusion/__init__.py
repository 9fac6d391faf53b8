"""The Gaussian diffusion process, the samplers that run it backwards, and images generated in batches."""
