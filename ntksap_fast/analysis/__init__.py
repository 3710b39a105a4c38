"""Reading results: per-layer reports, NTK spectra, round statistics and their stability."""
