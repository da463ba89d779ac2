// CUDA kernel for gathering KV blocks into a message and scattering them back (kv_block_copy.h).
//
// One thread block (CTA) per (layer, k/v, message block), as the CPU kernel has one unit; its
// threads stride over the block's tokens x selected heads in words of 16 bytes when every
// offset and both base pointers allow it (else 8, 4, 2 or 1), so each load and store is one
// vector access and consecutive threads touch consecutive words of a run.
//
// Queued on the caller's stream; nothing here synchronises. Not built into the CPU library:
// `make check` compiles it for sm_80 and sm_90 where nvcc exists.

#include <cuda_runtime.h>

#include <cstdint>

#include "kv_block_copy.h"

namespace {

constexpr int kThreadsPerBlock = 256;

// What the kernel needs of the layout, with sizes in words of `Word` bytes.
struct WordPlan {
  int64_t num_blocks;
  int64_t block_size;
  int64_t num_ids;
  int64_t cache_token_words;
  int64_t head_offset_words;
  int64_t run_words;
};

template <typename Word, bool kIsGather>
__global__ void kv_copy_kernel(Word* cache, Word* message, const int64_t* block_ids,
                               WordPlan plan, int* bad_id_count) {
  const int64_t unit = blockIdx.x;          // (layer * 2 + k/v) * num_ids + i
  const int64_t plane = unit / plan.num_ids;  // layer * 2 + k/v
  const int64_t block_id = block_ids[unit % plan.num_ids];
  if (block_id < 0 || block_id >= plan.num_blocks) {
    if (threadIdx.x == 0 && bad_id_count != nullptr) atomicAdd(bad_id_count, 1);
    return;
  }
  Word* cache_block = cache +
                      (plane * plan.num_blocks + block_id) * plan.block_size *
                          plan.cache_token_words +
                      plan.head_offset_words;
  Word* message_block = message + unit * plan.block_size * plan.run_words;
  // A block is at most a few MB, so 32-bit indices (cheaper division) suffice within it.
  const int run_words = static_cast<int>(plan.run_words);
  const int num_words = static_cast<int>(plan.block_size) * run_words;
  for (int word = threadIdx.x; word < num_words; word += blockDim.x) {
    const int token = word / run_words;
    Word* cache_word = cache_block + token * plan.cache_token_words + (word - token * run_words);
    if (kIsGather) {
      message_block[word] = *cache_word;
    } else {
      *cache_word = message_block[word];
    }
  }
}

// Byte sizes of one copy (as CopyPlan in kv_block_copy.cpp), before they become words.
struct ByteSizes {
  int64_t cache_token_bytes;  // one token's row (every head) in the cache
  int64_t head_offset_bytes;  // where the first selected head starts in a token's row
  int64_t run_bytes;          // one token's selected heads: a row of the message
};

template <typename Word, bool kIsGather>
cudaError_t launch_words(char* cache, char* message, const distserve_kv_layout& layout,
                         const int64_t* block_ids, int64_t num_ids, const ByteSizes& bytes,
                         int* bad_id_count, cudaStream_t stream) {
  constexpr int64_t kWordBytes = sizeof(Word);
  const WordPlan plan = {layout.num_blocks,
                         layout.block_size,
                         num_ids,
                         bytes.cache_token_bytes / kWordBytes,
                         bytes.head_offset_bytes / kWordBytes,
                         bytes.run_bytes / kWordBytes};
  const int64_t num_units = layout.num_layers * 2 * num_ids;
  kv_copy_kernel<Word, kIsGather>
      <<<static_cast<unsigned int>(num_units), kThreadsPerBlock, 0, stream>>>(
          reinterpret_cast<Word*>(cache), reinterpret_cast<Word*>(message), block_ids, plan,
          bad_id_count);
  return cudaGetLastError();
}

template <bool kIsGather>
cudaError_t launch(char* cache, char* message, const distserve_kv_layout* layout,
                   const int64_t* block_ids, int64_t num_ids, int64_t head_start,
                   int64_t head_end, int* bad_id_count, cudaStream_t stream) {
  if (layout == nullptr || layout->elem_bytes <= 0 || layout->num_layers <= 0 ||
      layout->num_blocks <= 0 || layout->block_size <= 0 || layout->num_heads <= 0 ||
      layout->head_dim <= 0 || num_ids < 0 || head_start < 0 || head_end <= head_start ||
      head_end > layout->num_heads) {
    return cudaErrorInvalidValue;
  }
  const int64_t head_bytes = layout->head_dim * layout->elem_bytes;
  const ByteSizes bytes = {layout->num_heads * head_bytes, head_start * head_bytes,
                           (head_end - head_start) * head_bytes};
  const int64_t num_units = layout->num_layers * 2 * num_ids;
  if (num_units == 0) return cudaSuccess;
  if (num_units > INT32_MAX || layout->block_size * bytes.run_bytes > INT32_MAX) {
    return cudaErrorInvalidValue;  // beyond the grid, or beyond 32-bit indices within a block
  }
  // The widest word that divides every offset the kernel forms, and both base addresses.
  const uint64_t offsets = static_cast<uint64_t>(bytes.cache_token_bytes) |
                           static_cast<uint64_t>(bytes.head_offset_bytes) |
                           static_cast<uint64_t>(bytes.run_bytes) |
                           reinterpret_cast<uintptr_t>(cache) |
                           reinterpret_cast<uintptr_t>(message);
  if (offsets % 16 == 0) {
    return launch_words<uint4, kIsGather>(cache, message, *layout, block_ids, num_ids, bytes,
                                          bad_id_count, stream);
  }
  if (offsets % 8 == 0) {
    return launch_words<uint2, kIsGather>(cache, message, *layout, block_ids, num_ids, bytes,
                                          bad_id_count, stream);
  }
  if (offsets % 4 == 0) {
    return launch_words<uint32_t, kIsGather>(cache, message, *layout, block_ids, num_ids, bytes,
                                             bad_id_count, stream);
  }
  if (offsets % 2 == 0) {
    return launch_words<uint16_t, kIsGather>(cache, message, *layout, block_ids, num_ids, bytes,
                                             bad_id_count, stream);
  }
  return launch_words<uint8_t, kIsGather>(cache, message, *layout, block_ids, num_ids, bytes,
                                          bad_id_count, stream);
}

}  // namespace

extern "C" {

cudaError_t distserve_kv_gather_cuda(const void* cache, void* out,
                                     const distserve_kv_layout* layout, const int64_t* block_ids,
                                     int64_t num_ids, int64_t head_start, int64_t head_end,
                                     int* bad_id_count, cudaStream_t stream) {
  // The gather only reads the cache; the kernel takes one pointer type for both directions.
  return launch<true>(const_cast<char*>(static_cast<const char*>(cache)), static_cast<char*>(out),
                      layout, block_ids, num_ids, head_start, head_end, bad_id_count, stream);
}

cudaError_t distserve_kv_scatter_cuda(void* cache, const void* src,
                                      const distserve_kv_layout* layout, const int64_t* block_ids,
                                      int64_t num_ids, int64_t head_start, int64_t head_end,
                                      int* bad_id_count, cudaStream_t stream) {
  return launch<false>(static_cast<char*>(cache), const_cast<char*>(static_cast<const char*>(src)),
                       layout, block_ids, num_ids, head_start, head_end, bad_id_count, stream);
}

}  // extern "C"
