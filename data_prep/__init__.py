"""``smae-pack``: turn folders and zip/tar archives of images into schema-1 shards.

Modules, one responsibility each:

- :mod:`data_prep.sources`  enumerate inputs (directories, zip, tar) in a deterministic order
  and read their bytes;
- :mod:`data_prep.images`   decode, convert to RGB 8-bit, slice, JPEG passthrough / encode;
- :mod:`data_prep.phash`    64-bit DCT perceptual hash (numpy only);
- :mod:`data_prep.dedup`    first-occurrence near-duplicate filter (multi-index band index);
- :mod:`data_prep.work`     the resumable work directory (fingerprint, batch results, shard log);
- :mod:`data_prep.worker`   one batch of inputs -> records, run in worker processes;
- :mod:`data_prep.pack`     orchestration: parallel ordered processing, dedup, shard writing;
- :mod:`data_prep.verify`   ``smae-pack verify``: check a packed directory record by record;
- :mod:`data_prep.cli`      argument parsing and the console entry point.

The on-disk format itself lives in :mod:`selectivemae_ds.data.shards` so it is defined once.
"""
