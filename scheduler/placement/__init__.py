"""Placing jobs on worker nodes: the dispatcher, the Lua scheduling scripts and their callers,
the Redis adapter, key names and the book of nodes attached to this instance."""
