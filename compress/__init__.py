"""edgedistill compress stage."""
