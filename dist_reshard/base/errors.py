"""The one exception type the converter raises for bad input or a failed job.

Its message is a single line that names the file, tensor or flag at fault; the launcher prints it once
per rank and exits non-zero, so the first line of the output tells a user what to fix.
"""


class ConversionError(Exception):
    """Bad input, bad flags, or a failure that makes the conversion impossible."""
