"""The public API gateway (port 8000): auth, limits, safe decode and URL fetch, fan-out to the captioner
and detector, partial results, inference log."""
