"""The Redis store, below placement and the cluster layer: the batching adapter
(``redis_adapter``), key names (``keys``), the Lua script calls (``lua``, ``scheduling``), the
outage clock (``outage``) and the retrying loops that survive an outage (``resilient``)."""
