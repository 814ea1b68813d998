"""edgedistill serve stage."""
