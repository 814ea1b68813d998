"""edgedistill distill stage."""
