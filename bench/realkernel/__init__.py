"""Real-kernel validation: the writers' rulesets loaded into the Linux kernel, in network
namespaces kpbench creates and removes itself, measured side by side with the models.

- :mod:`bench.realkernel.prereq`: root, the tools, IPVS support; installing the apt packages.
- :mod:`bench.realkernel.netns`: the client → node → pods namespaces, their veths and routes,
  and their removal (on exit, error, Ctrl-C, and stale ones from a crashed run).
- :mod:`bench.realkernel.agent`: the small programs run inside the namespaces (echo server,
  connection timer).
- :mod:`bench.realkernel.counters`: per-rule packet counters from the kernel and from the
  models, compared rule by rule.
- :mod:`bench.realkernel.runner`: one measured point per tool and services count.
- :mod:`bench.realkernel.command`: ``kpbench kernel``.
"""
