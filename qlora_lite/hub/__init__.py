"""The Hugging Face Hub: client, token, push with a model card, checkpoints on the Hub."""
