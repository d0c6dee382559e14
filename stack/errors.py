"""The one error `make up` reports: every module of the stack raises it, so it lives apart from them."""


class StackError(RuntimeError):
    """A service did not come up; the message names its log."""
