"""Bridges between two networks' feature layouts, as used by FCFD.

The implementation lives in :mod:`featkd.fcfd.bridges` (specs and :func:`build_bridge`) and
:mod:`featkd.fcfd.bridge_layers` (the layers); this module keeps the names importable from
``featkd.bridges``.
"""

from featkd.fcfd.bridge_layers import MapToTokens, PoolFeatures, Resize, TokensToMap
from featkd.fcfd.bridges import LAYOUTS, RESAMPLE_MODES, Bridge, FeatureSpec, build_bridge

__all__ = [
    "LAYOUTS",
    "RESAMPLE_MODES",
    "Bridge",
    "FeatureSpec",
    "MapToTokens",
    "PoolFeatures",
    "Resize",
    "TokensToMap",
    "build_bridge",
]
