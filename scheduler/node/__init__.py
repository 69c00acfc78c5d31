"""A worker node in a few lines (docs/nodes.md).

The author gives the language pairs, ``max_jobs`` and one function from a :class:`Job` to a
:class:`Result`; :class:`Node` does the rest: registration, heartbeats with a load score,
reconnection over several daemon URLs, job cancellation and deadlines, exactly one answer per
job, and on SIGTERM (or :meth:`Node.stop`) a drain that answers the jobs held before leaving::

    from scheduler.node import Job, Node, Result

    def translate(job: Job) -> Result:          # blocking: runs in a thread
        return Result(source_text="...", text="...")

    Node(translate, lang_pairs=[("en", "es")], max_jobs=2).main()
"""

from scheduler.node.command import add_arguments, from_arguments, run_node
from scheduler.node.job import Job, JobFailed, Result
from scheduler.node.link import NodeRefused
from scheduler.node.metrics import Stats
from scheduler.node.runner import Node, read_token

__all__ = ["Job", "JobFailed", "Node", "NodeRefused", "Result", "Stats", "add_arguments", "from_arguments", "read_token", "run_node"]
