"""edgemole: federated fine-tuning of language models on edge devices over MQTT.

This core package holds what every role stands on: the wire protocol, configuration, the adapter layers, the model,
data handling, broker helpers and the security set-up. The role packages (``edge_client``, ``aggregator``,
``export``) depend on it and never on each other; the tooling that drives them (``fleet``: the command line,
simulate, bench, flash, fleet status) sits above them. Nothing here imports a role or the tooling.
"""

__version__ = "0.1.0"
