"""Fleet security: a private CA, per-identity credentials and the Mosquitto TLS + ACL configuration."""

from edgemole.security.brokerdir import (
    DEFAULT_DEVICE_ROOT,
    RESERVED,
    FleetDir,
    acl_text,
    add_device,
    init_broker_dir,
    mosquitto_password_hash,
    revoke_device,
)

__all__ = ["DEFAULT_DEVICE_ROOT", "RESERVED", "FleetDir", "acl_text", "add_device", "init_broker_dir",
           "mosquitto_password_hash", "revoke_device"]
