"""Datasets: the real formats (``formats/``: a reader and a writer each), the synthetic benchmark
(``synth/``), the offline ETL (``etl/``), and the export of user feedback as training data."""
