"""Compression methods, one per file, behind one signature:

    compress(x, rank, config, *, kind, layers, heads, calibration, timer) -> store

x (B, T, G, F) holds keys (kind="k") or values ("v") of one token segment of a layer group (G layers,
F = kv_heads · head_dim), in the model dtype; the store rebuilds each layer (kvsvd.store).
``transform`` codes many matrices in one allocation (``transform.compress``, called by
``LowRankCache.transform_code``), so it has a signature of its own.
"""

from . import lowrank, minicache, pca

COMPRESSORS = {"svd": lowrank.compress, "xkv": lowrank.compress, "minicache": minicache.compress,
               "pca": pca.compress}
