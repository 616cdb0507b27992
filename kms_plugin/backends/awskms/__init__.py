"""The ``awskms`` key backend: AWS KMS over its JSON API, SigV4-signed, without boto3.

Modules: :mod:`.sigv4` (request signing), :mod:`.credentials` (credentials, region and
endpoint resolution), :mod:`.breaker` (circuit breaker), :mod:`.client` (HTTP client with
deadline-bounded retries and error mapping), :mod:`.backend` (the ``KeyBackend``).
"""

from kms_plugin.backends.awskms.backend import AwsKmsBackend, AwsKmsOptions

__all__ = ["AwsKmsBackend", "AwsKmsOptions"]
