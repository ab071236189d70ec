"""Type aliases of the public API's parameters (for annotations only)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Union

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from _typeshed import ReadableBuffer, WriteableBuffer

#: a file system path
PathArg = Union[str, "os.PathLike[str]"]
#: a size in bytes, or a string with a unit ("64KiB", "1.5G"): vdisk.parse_size
SizeArg = Union[int, str]
#: progress(done, total), called as work advances, last with done == total
Progress = Callable[[int, int], None]
#: bytes to write: any buffer, numpy arrays included (numpy's stubs declare an
#: ndarray a Buffer only from Python 3.12, where collections.abc.Buffer exists)
BytesIn = Union["ReadableBuffer", "npt.NDArray[Any]"]
#: a buffer of bytes whose len() counts its bytes (what FileIO writes)
ByteBuffer = Union[bytes, bytearray, memoryview, "npt.NDArray[np.uint8]"]
#: a buffer to read into: any writable buffer, numpy arrays included
BytesOut = Union["WriteableBuffer", "npt.NDArray[Any]"]
