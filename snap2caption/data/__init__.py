"""Datasets: synthetic scenes, readers for the real formats, and the offline ETL."""
