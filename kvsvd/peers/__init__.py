"""Peers: the dense references and the caches and presses of other packages, one file each, as grid methods.

Each peer is a small frozen dataclass (:class:`~kvsvd.peers.base.Peer`) whose fields are the keys its grid
entry takes besides ``method``, with their defaults; it builds its cache (and press), names its label,
its report family, the package it runs in and the path its K/V matrices run. Its bytes are counted by
``kvsvd.accounting`` like kvsvd's own.
"""

from .base import Peer
from .dense import Dense, Dense16
from .press import Press
from .quantized import Quantized
from .turboquant import TurboQuant

PEERS: dict[str, type[Peer]] = {p.name: p for p in (Dense, Dense16, Press, Quantized, TurboQuant)}
