"""Many images: frame streams (video files, cameras), offline batches (one machine, Ray)."""
