"""The server side: the MQTT aggregation service, its strategies, round bookkeeping and checkpoints."""
