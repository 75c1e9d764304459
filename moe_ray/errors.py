"""moe-ray's error types: every bad input becomes one of these, with a message a user can act on."""


class MoeRayError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero."""


class CheckpointError(MoeRayError):
    """A checkpoint is missing, unreadable, corrupted, or of an unknown layout."""


class SpecError(MoeRayError):
    """A job spec names something that cannot run (bad path, analysis, layer, resource)."""


class StoreError(MoeRayError):
    """A results store cannot be created, reused or read."""


class JobError(MoeRayError):
    """A Ray job could not be submitted, reached, or did not succeed."""


class StorageError(MoeRayError):
    """A checkpoint's or a store's location cannot be reached, read or written (credentials, bucket,
    permissions, a read-only filesystem)."""
