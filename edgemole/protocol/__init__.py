"""The wire protocol: MQTT topics, safetensors messages and the validator every inbound message passes."""

from edgemole.protocol.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DONE,
    PHASES,
    SCHEMA_VERSION,
    Kind,
    Message,
    decode,
    encode,
)
from edgemole.protocol.topics import Topics, check_name
from edgemole.protocol.validate import (
    RANKS_ROLE,
    TensorSpec,
    check_rank_slices,
    check_tensors,
    spec_of,
    validate_assignment,
    validate_update,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DONE",
    "PHASES",
    "RANKS_ROLE",
    "SCHEMA_VERSION",
    "Kind",
    "Message",
    "TensorSpec",
    "Topics",
    "check_name",
    "check_rank_slices",
    "check_tensors",
    "decode",
    "encode",
    "spec_of",
    "validate_assignment",
    "validate_update",
]
