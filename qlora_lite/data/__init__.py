"""Training data: read files, detect formats, encode with the chat template and loss masks, labels."""
