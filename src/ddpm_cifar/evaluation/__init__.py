"""FID (Inception statistics, then distance), scoring samples and models, reports and plots."""
