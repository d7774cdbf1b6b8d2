"""Making models: training a tree parents-first (:mod:`nodes.build.builder`), one node's
training and perplexity (:mod:`nodes.build.training`), local fine-tunes
(:mod:`nodes.build.finetune`), the evaluation gate (:mod:`nodes.build.gate`), chain
composition (:mod:`nodes.build.compose`) and exports for devices and other servers
(:mod:`nodes.build.export`, built and cached by :mod:`nodes.build.variants`).
"""

__all__: list[str] = []
