"""Snap2Caption on Chameleon Cloud: the plan (``plan.py``), the python-chi calls that carry it out
(``chi_backend.py``), and the command (``python -m infra.chameleon up|down [--dry-run]``)."""
