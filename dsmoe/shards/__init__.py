"""WebDataset shards: their format (``format``), the converter from raw dataset layouts (``layouts``, ``writer``,
``python -m dsmoe.shards``) and verification (``verify``).

The converter works in five steps, so that its output does not depend on the number of workers and every image is
decoded and encoded once:

1. *Screen* (main process, ``plan``): unknown splits and records without a non-empty caption are skipped; blank
   captions inside a kept record are dropped and counted per language.
2. *Prepare* (pool, chunks of records in order, ``workers``): every image or video is read, hashed and decoded;
   unreadable or missing ones are skipped. An RGB JPEG file kept at its size is passed through unchanged (checked
   with a reduced-size "draft" decode, which reads all of its entropy-coded data); anything else (other formats,
   ``resize``, video frames, images stored in a Hugging Face dataset) is encoded once here, to JPEG quality 95,
   and *spilled* to ``.make_shards.spill/<chunk>.bin`` so that the shard writer copies the bytes instead of
   encoding again. Each record's member sizes are returned.
3. *Plan* (main process, ``plan``): duplicates (same split and image id, or source for person data, as an earlier
   accepted record) are skipped, keys are assigned and shard boundaries are cut: a shard ends when it holds
   ``samples_per_shard`` samples, or when adding the next sample would make the tar file larger than
   ``max_shard_bytes``. Tar sizes are computed exactly from the member sizes (``tar``), so the byte limit holds
   for the real files; a single sample larger than the limit gets a shard of its own.
4. *Build* (pool, one task per shard, ``workers``): each worker writes a whole shard to ``name.tar.tmp-<pid>`` and
   renames it, so a shard appears under its final name only when complete. A shard whose file exists with the
   checksum recorded for the same plan (in the manifest of a previous run, or in the journal of an interrupted
   one) is kept as it is.
5. *Manifests* (main process, ``writer``): ``{split}.manifest.json`` is written atomically after all shards;
   shard files of a split that are no longer listed, manifests of splits that have no input any more, the spill
   directory and the journal are then removed.
"""
