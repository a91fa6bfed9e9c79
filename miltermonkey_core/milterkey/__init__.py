"""The milter key: a signed header saying which brains already judged a message.

The seed's "free pass": a message scanned for viruses on the outgoing relay
should not be scanned again on the incoming server.  ``docs/milter-key.md``
is the administrator's description; :mod:`.fields` holds the header format,
:mod:`.secrets` the secret file, :mod:`.service` checking and signing.
"""

from miltermonkey_core.milterkey.fields import (
    BOUND_HEADERS,
    FORMAT_VERSION,
    MIN_SECRET_BYTES,
    KeyFields,
    MalformedKey,
    ObsoleteKey,
    Reason,
    canonical_header_value,
    mime_digest,
    normalize_message_id,
)
from miltermonkey_core.milterkey.secrets import (
    check_secret_file,
    generate_secret_file,
    load_secrets,
    parse_secrets,
    trusted_owners,
)
from miltermonkey_core.milterkey.service import KeyCheck, KeyInspection, KeyService

__all__ = [
    "BOUND_HEADERS",
    "FORMAT_VERSION",
    "MIN_SECRET_BYTES",
    "KeyCheck",
    "KeyFields",
    "KeyInspection",
    "KeyService",
    "MalformedKey",
    "ObsoleteKey",
    "Reason",
    "canonical_header_value",
    "check_secret_file",
    "generate_secret_file",
    "load_secrets",
    "mime_digest",
    "normalize_message_id",
    "parse_secrets",
    "trusted_owners",
]
