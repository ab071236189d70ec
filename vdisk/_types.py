"""Type aliases of the public API's parameters (for annotations only)."""
from __future__ import annotations

import os
from typing import Callable, Union

#: a file system path
PathArg = Union[str, "os.PathLike[str]"]
#: a size in bytes, or a string with a unit ("64KiB", "1.5G"): vdisk.parse_size
SizeArg = Union[int, str]
#: progress(done, total), called as work advances, last with done == total
Progress = Callable[[int, int], None]
