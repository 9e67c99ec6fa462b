"""The built-in demos on real small models (SmolLM2-135M, all-MiniLM-L6-v2)."""
