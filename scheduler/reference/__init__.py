"""Reference tools, not part of the daemon: a worker node with its ASR engines and a
streaming client (``scheduler node``, ``scheduler client``)."""
