"""Never lose work: atomic verified checkpoints, durable places, background copier, resume state, run listing."""
