"""A minimal pure-Python data provider for structure-aware targets: turns the fuzzer's bytes
into choices. Deterministic, and needs no atheris, so pytest can replay any input."""


class FuzzedDataProvider:
    def __init__(self, data: bytes):
        self._d = memoryview(data)
        self._i = 0

    def _take(self, n: int) -> bytes:
        b = bytes(self._d[self._i:self._i + n])
        self._i += len(b)
        return b.ljust(n, b"\0")

    def ConsumeBool(self) -> bool:  # noqa: N802 - atheris' names
        return bool(self._take(1)[0] & 1)

    def ConsumeIntInRange(self, lo: int, hi: int) -> int:  # noqa: N802
        span = hi - lo + 1
        nbytes = max(1, (span.bit_length() + 7) // 8)
        return lo + int.from_bytes(self._take(nbytes), "little") % span

    def ConsumeInt(self, nbytes: int) -> int:  # noqa: N802
        v = int.from_bytes(self._take(nbytes), "little")
        return v - (1 << (8 * nbytes - 1)) if v >= 1 << (8 * nbytes - 1) else v
