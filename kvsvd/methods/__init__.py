"""kvsvd's compression methods, one file each, every one a :class:`~kvsvd.methods.base.Method`.

A per-segment method compresses x (B, T, G, F), the keys (kind "k") or values ("v") of one token segment
of a layer group (G layers, F = kv_heads · head_dim), into a store (``kvsvd.store``);
``transform`` codes every group's prefill in one allocation (:meth:`Transform.code`).
"""

from .base import Method
from .lowrank import SVD, XKV
from .minicache import MINICACHE
from .pca import PCA
from .transform import TRANSFORM

METHODS: dict[str, Method] = {m.name: m for m in (SVD, XKV, MINICACHE, PCA, TRANSFORM)}
