// First-touch cost of large CPU outputs. A freshly allocated buffer of tens
// of MB (torch frees and re-mmaps those on every call) costs one page fault
// per 4 KiB when a kernel first writes it -- more time than the kernel itself
// for LayerNorm at 16384 x 768. Asking for transparent huge pages makes that
// one fault per 2 MiB. Harmless on memory that is already mapped.
#pragma once

#include <cstddef>

namespace zerofuse::detail {

void prefer_huge_pages(void* data, std::size_t bytes);

}  // namespace zerofuse::detail
