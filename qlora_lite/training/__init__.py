"""The training loop and one `run` for every task (causal LM, classifier); record and evaluation."""
