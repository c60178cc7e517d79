"""The captioner service: image -> caption over REST (``snap2caption serve captioner``, port 8001)."""
