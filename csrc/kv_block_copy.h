/* Gather a request's KV blocks out of a paged cache into a contiguous message, and scatter them
 * back: the C ABI shared by the CPU kernel (kv_block_copy.cpp) and the CUDA one
 * (kv_block_copy.cu). No torch headers; callers pass raw pointers and the layout.
 *
 * The cache of one rank (distserve/engine/kv_spec.py), and the message for `num_ids` blocks
 * restricted to heads [head_start, head_end):
 *
 *   cache   (num_layers, 2, num_blocks, block_size, num_heads,              head_dim)
 *   message (num_layers, 2, num_ids,    block_size, head_end - head_start, head_dim)
 *
 *   gather : message[l, kv, i, t, h - head_start, :] = cache[l, kv, block_ids[i], t, h, :]
 *   scatter: cache[l, kv, block_ids[i], t, h, :]    = message[l, kv, i, t, h - head_start, :]
 *
 * Both tensors are dense (C-contiguous); elements are copied as opaque `elem_bytes`-byte values,
 * so any dtype works. Scatter's block ids must be distinct (with duplicates, which bytes land is
 * unspecified, as with torch's index_copy_). The message and the cache must not overlap.
 */
#ifndef DISTSERVE_KV_BLOCK_COPY_H_
#define DISTSERVE_KV_BLOCK_COPY_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a signature or struct below changes; the Python wrapper refuses a mismatch. */
#define DISTSERVE_KV_ABI_VERSION 1

typedef struct {
  int64_t elem_bytes; /* bytes per element: 2 for bf16/fp16, 4 for fp32 */
  int64_t num_layers;
  int64_t num_blocks; /* blocks in the cache (not in the message) */
  int64_t block_size; /* tokens per block */
  int64_t num_heads;  /* KV heads held by this rank's cache */
  int64_t head_dim;
} distserve_kv_layout;

typedef enum {
  DISTSERVE_KV_OK = 0,
  DISTSERVE_KV_BAD_LAYOUT = 1,   /* a non-positive size in the layout */
  DISTSERVE_KV_BAD_HEADS = 2,    /* not 0 <= head_start < head_end <= num_heads */
  DISTSERVE_KV_BAD_BLOCK_ID = 3, /* a block id outside [0, num_blocks); nothing was copied */
} distserve_kv_status;

int distserve_kv_abi_version(void);

/* CPU. `num_threads` OpenMP threads (< 1: one); the caller passes its framework's setting so
 * that the copy does not oversubscribe cores the instance was pinned to. Every block id is
 * checked before any byte moves. Returns a distserve_kv_status. */
int distserve_kv_gather(const void* cache, void* out, const distserve_kv_layout* layout,
                        const int64_t* block_ids, int64_t num_ids, int64_t head_start,
                        int64_t head_end, int num_threads);
int distserve_kv_scatter(void* cache, const void* src, const distserve_kv_layout* layout,
                         const int64_t* block_ids, int64_t num_ids, int64_t head_start,
                         int64_t head_end, int num_threads);

/* CUDA, declared when the CUDA runtime API is in scope. `cache`, the message and `block_ids`
 * are device pointers; the copy is queued on `stream`. Ids cannot be checked before the launch
 * without a device->host sync, so a bad id is skipped and counted into `*bad_id_count` (a
 * device int, may be NULL) for the caller to inspect when it next syncs. Returns cudaSuccess
 * once queued, cudaErrorInvalidValue for a bad layout or head range, else the launch error. */
#ifdef CUDART_VERSION
cudaError_t distserve_kv_gather_cuda(const void* cache, void* out,
                                     const distserve_kv_layout* layout, const int64_t* block_ids,
                                     int64_t num_ids, int64_t head_start, int64_t head_end,
                                     int* bad_id_count, cudaStream_t stream);
cudaError_t distserve_kv_scatter_cuda(void* cache, const void* src,
                                      const distserve_kv_layout* layout, const int64_t* block_ids,
                                      int64_t num_ids, int64_t head_start, int64_t head_end,
                                      int* bad_id_count, cudaStream_t stream);
#endif

#ifdef __cplusplus
}
#endif

#endif /* DISTSERVE_KV_BLOCK_COPY_H_ */
