"""`python -m tests.malloc_probe MODE ARGS...`: run cifarcnn in this fresh interpreter, then print as JSON
what glibc's malloc does with a large block: `mapped`, whether it got a mapping of its own (mallinfo2's
hblkhd grew), and `kept`, whether it came from the heap and the heap kept its pages after `free` (not
trimmed: arena stayed). The block is larger than every free chunk in the heaps, so it can only come from a
new mapping or the heap's top.

    library RUN IMAGE   select_device("cpu") and the library's predict on IMAGE, as a notebook would
    cli ARGS...         cifarcnn.cli.main(ARGS), as the `cifarcnn` command runs
"""

from __future__ import annotations

import ctypes
import json
import sys

LIBC = ctypes.CDLL(None)
LIBC.malloc.restype = ctypes.c_void_p
LIBC.malloc.argtypes = [ctypes.c_size_t]
LIBC.free.argtypes = [ctypes.c_void_p]
FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
          "keepcost")


class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2: ten size_t fields
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]


LIBC.mallinfo2.restype = MallInfo2


def large_block() -> dict:
    before = LIBC.mallinfo2()
    size = before.fordblks + 64 * 2**20  # no free chunk can serve it
    block = LIBC.malloc(size)
    held = LIBC.mallinfo2()
    LIBC.free(block)
    after = LIBC.mallinfo2()
    mapped = held.hblkhd - before.hblkhd >= size
    grew = held.arena > before.arena  # the heap's top was extended (by the block, less the free top it had)
    return {"mapped": mapped, "kept": not mapped and grew and after.arena >= held.arena}


def main() -> int:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "library":
        from cifarcnn.base.device import select_device
        from cifarcnn.use.predict import predict

        select_device("cpu")
        code = predict(args[0], args[1:], device="cpu", quiet=True)
    else:
        from cifarcnn.cli import main as cli

        code = cli(args)
    print(json.dumps({"exit": code, **large_block()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
