# Type stub of the C extension hourglass/collector/_otlpscan.c (see there and hourglass/collector/native_decode.py).
from typing import Any

from numpy.typing import NDArray
from typing_extensions import Buffer

SPAN_WIDTH: int
ATTR_WIDTH: int
KEY_WIDTH: int
EVENT_WIDTH: int
LINK_WIDTH: int
SCOPE_WIDTH: int
RESOURCE_WIDTH: int

def scan(data: Buffer, /) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes, bytes] | str: ...
def gather(
    data: Buffer, starts: Buffer | NDArray[Any], lengths: Buffer | NDArray[Any], /
) -> tuple[bytes, bytes]: ...
