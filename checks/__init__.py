"""Built-in check plugins, one module per family."""
