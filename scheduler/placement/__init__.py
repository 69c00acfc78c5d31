"""Placing jobs on worker nodes: the dispatcher, its fair queue and deadlines, and the book of
nodes attached to this instance. The Redis calls it makes live in ``scheduler/store/``."""
