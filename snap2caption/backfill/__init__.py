"""Batch backfill on Ray Data: caption, alt text, tags and objects for a whole image library.

``snap2caption backfill --input DIR|manifest.parquet --out DIR`` runs :func:`run_backfill`:

1. :mod:`.inputs`: the images to do: every file under a folder, or a Parquet manifest's ``path`` column,
   less those the output already holds (a second run skips them: resumable and idempotent).
2. :mod:`.stages`: a Ray Data pipeline. Tasks read each file and decode it with the shared safe decoder
   (:mod:`snap2caption.imaging`), once; a file it refuses becomes a quarantine row with the reason, and
   the run goes on. Then one actor pool per model (captioner, tagger, detector), each actor loading its
   model once with the loader the services use (``caption.load``, ``tagger.load``, ``detector.load``), on
   batches; then the alt text, with the gateway's rules (:mod:`snap2caption.alt_text`). No image flows
   before every actor is up (``actor_start_s``, 10 minutes): the first batches are not all handed to the
   first actor ready, and a pool the cluster cannot place fails with Ray's "Timed out while starting
   actors" instead of waiting forever.
3. :mod:`.output`: the driver writes the rows as they arrive, a Parquet part at a time (each part
   renamed into place whole, so a crash loses at most the part being written), and the quarantined
   files to their own parts; a ``summary.json`` gives the counts, the throughput and the nodes used.

The models are the registry's ``production`` versions by default; the alias is resolved once, on the
driver, and every actor loads that version (``models:/NAME/VERSION``), so all rows of a run name the same
versions even when the alias moves meanwhile. On a cluster (``--address``) every node reads the inputs,
the registry and the output folder at the same paths (a shared file system or object store) and has the
project installed.
"""

from __future__ import annotations

from snap2caption.backfill.job import BackfillConfig, BackfillSummary, run_backfill
from snap2caption.backfill.stages import FEATURES_PARTS, ModelRef

__all__ = ["FEATURES_PARTS", "BackfillConfig", "BackfillSummary", "ModelRef", "run_backfill"]
