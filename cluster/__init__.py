"""Composition root: the ``treelm`` CLI (:mod:`cluster.cli`), one server's composition
(:mod:`cluster.service`), the Ray cluster (:mod:`cluster.ray`), the update desk
(:mod:`cluster.updates`) and importing built trees into the registry
(:mod:`cluster.tree_import`). Nothing is re-exported here: importing a submodule (the CLI's
help, say) must not load torch or Ray; import from the modules.
"""

__all__: list[str] = []
