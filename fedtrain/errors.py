"""The one exception type for mistakes a user can make.

Its message is a single sentence that says what is wrong and what to do; the CLI prints it
without a traceback. Everything else that escapes is a bug in fedtrain.
"""


class FedtrainError(Exception):
    """A problem the user can fix (bad path, bad config, wrong key, incompatible model...)."""


def find_fedtrain_error(exc: BaseException) -> FedtrainError | None:
    """Return the FedtrainError behind `exc` (Flower and Ray wrap exceptions), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, FedtrainError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
