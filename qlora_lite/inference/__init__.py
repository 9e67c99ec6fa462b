"""Use a trained run: generation, classification (adapters and the server join here)."""
