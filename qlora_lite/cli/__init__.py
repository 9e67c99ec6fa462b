"""`qlora-lite`: one module per command group, each a thin layer over the Python API."""
