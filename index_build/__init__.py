"""index_build: geo-tagged aerial tiles -> L2LTR embeddings -> FAISS index artifact.

Stages (each reads and writes plain files, each can be run and resumed alone):

    reader   (sources.py, validate.py)   catalogue CSV or slippy-map dir -> validated catalog.csv + plan.json
    mapper   (encode_local.py / encode_ray.py)   catalog.csv -> vectors/shard-NNNNN.npy (+ .json sidecar,
                                                 + .columns.npy with an orientation head)
    writer   (faiss_index.py, artifact.py)  shards -> index.faiss + tiles.csv + manifest.json (+ orientation.npy),
                                            published atomically

Before the reader, `tile` (raster_tiles.py) can make a catalogue: a georeferenced raster (orthophoto,
any CRS) cut into north-up tiles + tiles.csv, read window by window.

The command line lives in cli.py (`python -m index_build ...`, console script `index-build`).
"""
