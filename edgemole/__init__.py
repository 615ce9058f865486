"""edgemole: federated fine-tuning of language models on edge devices over MQTT.

This shared package holds what more than one role needs: the wire protocol, configuration,
the adapter layers, data handling and the ``edgemole`` command line. The role packages
(``edge_client``, ``aggregator``, ``export``) depend on it and never on each other.
"""

__version__ = "0.1.0"
