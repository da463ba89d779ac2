// CPU kernel for gathering KV blocks into a message and scattering them back (kv_block_copy.h).
//
// Owns the byte copies only; the Python wrapper (distserve/kernels/kv_copy.py) decides when to
// call it. The work is cut into one unit per (layer, k/v, message block); each unit is one
// memcpy of a whole block when every head is copied, else one memcpy per token of the selected
// heads (the heads of one token are adjacent in both tensors):
//
//   cache block (block_size rows of num_heads * head_dim)      message block
//   t0 | h0 h1 [h2 h3] h4 ... |   --- run_bytes --->   t0 | h2 h3 |
//   t1 | h0 h1 [h2 h3] h4 ... |   --- run_bytes --->   t1 | h2 h3 |
//
// Units run on an OpenMP team of at most the caller's size, with at least kMinBytesPerThread
// for each thread: a copy under twice that stays on the calling thread.

#include <algorithm>
#include <cstring>

#include "kv_block_copy.h"

namespace {

// Waking a thread of an OpenMP team costs microseconds (far more when the machine's cores are
// oversubscribed and it is not scheduled); a share smaller than this is not worth it.
constexpr int64_t kMinBytesPerThread = int64_t{1} << 20;

// Byte sizes of the runs a copy moves, derived once from the layout and the head range.
struct CopyPlan {
  int64_t cache_block_bytes;  // one block of one (layer, k/v) plane in the cache
  int64_t cache_token_bytes;  // one token's row (every head) in the cache
  int64_t head_offset_bytes;  // where the first selected head starts in a token's row
  int64_t run_bytes;          // one token's selected heads: a row of the message
  bool is_all_heads;          // a block is one contiguous run in both tensors
};

bool is_valid_layout(const distserve_kv_layout& layout) {
  return layout.elem_bytes > 0 && layout.num_layers > 0 && layout.num_blocks > 0 &&
         layout.block_size > 0 && layout.num_heads > 0 && layout.head_dim > 0;
}

CopyPlan make_plan(const distserve_kv_layout& layout, int64_t head_start, int64_t head_end) {
  const int64_t head_bytes = layout.head_dim * layout.elem_bytes;
  CopyPlan plan;
  plan.cache_token_bytes = layout.num_heads * head_bytes;
  plan.cache_block_bytes = layout.block_size * plan.cache_token_bytes;
  plan.head_offset_bytes = head_start * head_bytes;
  plan.run_bytes = (head_end - head_start) * head_bytes;
  plan.is_all_heads = plan.run_bytes == plan.cache_token_bytes;
  return plan;
}

// kIsGather: cache -> message; else message -> cache. `cache` and `message` are byte pointers
// to the tensors' first elements.
template <bool kIsGather>
int copy_blocks(char* cache, char* message, const distserve_kv_layout* layout_ptr,
                const int64_t* block_ids, int64_t num_ids, int64_t head_start, int64_t head_end,
                int num_threads) {
  if (layout_ptr == nullptr || !is_valid_layout(*layout_ptr) || num_ids < 0) {
    return DISTSERVE_KV_BAD_LAYOUT;
  }
  const distserve_kv_layout& layout = *layout_ptr;
  if (head_start < 0 || head_end <= head_start || head_end > layout.num_heads) {
    return DISTSERVE_KV_BAD_HEADS;
  }
  for (int64_t i = 0; i < num_ids; ++i) {  // all checked first: a bad id copies nothing
    if (block_ids[i] < 0 || block_ids[i] >= layout.num_blocks) return DISTSERVE_KV_BAD_BLOCK_ID;
  }
  const CopyPlan plan = make_plan(layout, head_start, head_end);
  const int64_t message_block_bytes = layout.block_size * plan.run_bytes;
  const int64_t num_units = layout.num_layers * 2 * num_ids;
  const int64_t max_team_size = num_units * message_block_bytes / kMinBytesPerThread;
  const int team_size = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(num_threads, max_team_size)));
  const bool is_parallel = team_size > 1;

#pragma omp parallel for schedule(static) num_threads(team_size) if (is_parallel)
  for (int64_t unit = 0; unit < num_units; ++unit) {
    const int64_t plane = unit / num_ids;  // layer * 2 + k/v
    const int64_t block_id = block_ids[unit % num_ids];
    char* cache_block = cache + (plane * layout.num_blocks + block_id) * plan.cache_block_bytes +
                        plan.head_offset_bytes;
    char* message_block = message + unit * message_block_bytes;
    const int64_t num_runs = plan.is_all_heads ? 1 : layout.block_size;
    const int64_t cache_stride = plan.is_all_heads ? 0 : plan.cache_token_bytes;
    const int64_t run_bytes = plan.is_all_heads ? message_block_bytes : plan.run_bytes;
    for (int64_t run = 0; run < num_runs; ++run) {
      char* cache_run = cache_block + run * cache_stride;
      char* message_run = message_block + run * run_bytes;
      if (kIsGather) {
        std::memcpy(message_run, cache_run, static_cast<size_t>(run_bytes));
      } else {
        std::memcpy(cache_run, message_run, static_cast<size_t>(run_bytes));
      }
    }
  }
  return DISTSERVE_KV_OK;
}

}  // namespace

extern "C" {

int distserve_kv_abi_version(void) { return DISTSERVE_KV_ABI_VERSION; }

int distserve_kv_gather(const void* cache, void* out, const distserve_kv_layout* layout,
                        const int64_t* block_ids, int64_t num_ids, int64_t head_start,
                        int64_t head_end, int num_threads) {
  // The gather only reads the cache; copy_blocks takes one pointer type for both directions.
  return copy_blocks<true>(const_cast<char*>(static_cast<const char*>(cache)),
                           static_cast<char*>(out), layout, block_ids, num_ids, head_start,
                           head_end, num_threads);
}

int distserve_kv_scatter(void* cache, const void* src, const distserve_kv_layout* layout,
                         const int64_t* block_ids, int64_t num_ids, int64_t head_start,
                         int64_t head_end, int num_threads) {
  return copy_blocks<false>(static_cast<char*>(cache),
                            const_cast<char*>(static_cast<const char*>(src)), layout, block_ids,
                            num_ids, head_start, head_end, num_threads);
}

}  // extern "C"
