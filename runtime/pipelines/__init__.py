"""Many images: video streams, offline batches (one machine, Ray)."""
