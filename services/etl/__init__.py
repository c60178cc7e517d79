"""The ETL service: dataset build jobs over REST (``snap2caption serve etl``, port 8003)."""
