"""edgedistill: shared formats (task spec, manifests, prompts, metrics) and the CLI."""
__version__ = "0.1.0"
