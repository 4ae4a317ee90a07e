"""Human-readable reports on the scoring job's output."""
