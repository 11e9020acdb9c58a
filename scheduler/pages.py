"""The KV-cache page allocator. The worker owns the memory; the scheduler owns the page ids."""

from __future__ import annotations


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: recently freed pages reused first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def can_allocate(self, tokens: int) -> bool:
        return self.pages_for(tokens) <= len(self._free)

    def allocate(self, tokens: int) -> list[int]:
        count = self.pages_for(tokens)
        if count > len(self._free):
            raise MemoryError(f"{count} KV pages needed, {len(self._free)} free")
        pages = self._free[-count:][::-1] if count else []
        del self._free[len(self._free) - count:]
        return pages

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
