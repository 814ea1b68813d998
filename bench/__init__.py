"""edgedistill bench stage."""
