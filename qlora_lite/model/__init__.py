"""Load a base model (4/8/16-bit, local folder or Hub id) and attach a PEFT method."""
