"""fastat: fast equivariant adversarial training of diffusion models."""

__version__ = "0.1.0"
