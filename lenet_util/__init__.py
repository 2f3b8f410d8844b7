"""What every lenet package shares and none owns: the error every program turns into one line,
the command-line conventions, and writing files whole or not at all. Imports nothing of
lenet's own."""

from lenet_util.errors import LenetError
from lenet_util.files import OutputError, atomic_write_bytes, check_output, not_a_file

__all__ = ["LenetError", "OutputError", "atomic_write_bytes", "check_output", "not_a_file"]
