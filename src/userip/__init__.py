"""UserIP-Tuning: latent user profiles from a frozen causal LLM, quantized into IDs for CTR models."""

__version__ = "0.1.0"
