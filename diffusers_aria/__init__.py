"""diffusers-aria: adaptive region-based importance allocation of conditioning prompts for diffusion distillation."""

__version__ = "0.1.0"
