"""The device side: local data, training engines and the MQTT edge client."""
