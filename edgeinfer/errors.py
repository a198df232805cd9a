"""The one error type users see: a plain sentence, exit status 2, no traceback."""


class EdgeInferError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The CLI prints ``edgeinfer: <message>`` and exits with status 2.
    """

    exit_code = 2
