"""The load generator behind ``kefu bench`` (see docs/benchmarks.md).

Modules: :mod:`cli` (the command line), :mod:`local` (the full run against servers it
starts), :mod:`desk` (the help desk), :mod:`cluster` (Redis + PostgreSQL + N nodes:
cross-node chat and connection capacity), :mod:`scenarios` (each measurement),
:mod:`swarm` (the parent's side of the worker processes), :mod:`worker` and :mod:`fleet`
(one worker process and its sockets), :mod:`commands` (what goes over the pipes),
:mod:`servers` (child node and echo server), :mod:`echo` (the echo server), :mod:`procfs`
(RSS and CPU from /proc), :mod:`stats` (percentiles and the other pure arithmetic) and
:mod:`report` (tables and the doc).
"""
