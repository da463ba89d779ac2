// Self-test of the CPU kernel against a naive element-by-element copy, run by `make check`
// (built with AddressSanitizer and UBSan, so an out-of-bounds run fails it too). The Python
// tests (tests/kernels/) compare the library with the PyTorch copy; this one needs no torch.

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../kv_block_copy.h"

namespace {

int g_num_failures = 0;

void expect(bool is_ok, const char* what, int case_no) {
  if (!is_ok) {
    std::fprintf(stderr, "FAIL case %d: %s\n", case_no, what);
    ++g_num_failures;
  }
}

// A fixed pseudo-random byte stream, so that every element differs from its neighbours.
std::vector<unsigned char> random_bytes(size_t n, uint32_t seed) {
  std::vector<unsigned char> bytes(n);
  for (auto& byte : bytes) {
    seed = seed * 1664525u + 1013904223u;
    byte = static_cast<unsigned char>(seed >> 24);
  }
  return bytes;
}

// `num_ids` distinct block ids out of `num_blocks`, shuffled.
std::vector<int64_t> shuffled_ids(int64_t num_blocks, int64_t num_ids, uint32_t seed) {
  std::vector<int64_t> ids(static_cast<size_t>(num_blocks));
  for (int64_t i = 0; i < num_blocks; ++i) ids[static_cast<size_t>(i)] = i;
  for (int64_t i = num_blocks - 1; i > 0; --i) {
    seed = seed * 1664525u + 1013904223u;
    const int64_t j = static_cast<int64_t>(seed >> 8) % (i + 1);
    std::swap(ids[static_cast<size_t>(i)], ids[static_cast<size_t>(j)]);
  }
  ids.resize(static_cast<size_t>(num_ids));
  return ids;
}

// Byte offset of element (layer, kv, block, token, head) of a (L, 2, blocks, bs, heads, D) tensor.
size_t offset(const distserve_kv_layout& l, int64_t num_blocks, int64_t num_heads, int64_t layer,
              int64_t kv, int64_t block, int64_t token, int64_t head) {
  const int64_t index =
      ((((layer * 2 + kv) * num_blocks + block) * l.block_size + token) * num_heads + head) *
      l.head_dim;
  return static_cast<size_t>(index * l.elem_bytes);
}

// Naive copy: one head at a time, by definition of gather/scatter in kv_block_copy.h.
void reference_copy(bool is_gather, std::vector<unsigned char>& cache,
                    std::vector<unsigned char>& message, const distserve_kv_layout& l,
                    const std::vector<int64_t>& ids, int64_t h0, int64_t h1) {
  const auto n = static_cast<int64_t>(ids.size());
  const auto head_bytes = static_cast<size_t>(l.head_dim * l.elem_bytes);
  for (int64_t layer = 0; layer < l.num_layers; ++layer) {
    for (int64_t kv = 0; kv < 2; ++kv) {
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t t = 0; t < l.block_size; ++t) {
          for (int64_t h = h0; h < h1; ++h) {
            unsigned char* c =
                &cache[offset(l, l.num_blocks, l.num_heads, layer, kv, ids[i], t, h)];
            unsigned char* m = &message[offset(l, n, h1 - h0, layer, kv, i, t, h - h0)];
            std::memcpy(is_gather ? m : c, is_gather ? c : m, head_bytes);
          }
        }
      }
    }
  }
}

void check_case(int case_no, const distserve_kv_layout& l, int64_t num_ids, int64_t h0,
                int64_t h1, int num_threads) {
  const auto ids = shuffled_ids(l.num_blocks, num_ids, static_cast<uint32_t>(case_no));
  const auto cache_bytes = static_cast<size_t>(l.num_layers * 2 * l.num_blocks * l.block_size *
                                               l.num_heads * l.head_dim * l.elem_bytes);
  const auto message_bytes = static_cast<size_t>(l.num_layers * 2 * num_ids * l.block_size *
                                                 (h1 - h0) * l.head_dim * l.elem_bytes);
  auto cache = random_bytes(cache_bytes, 1u + static_cast<uint32_t>(case_no));
  auto message = random_bytes(message_bytes, 7u + static_cast<uint32_t>(case_no));

  auto expected_message = message;
  reference_copy(true, cache, expected_message, l, ids, h0, h1);
  int status = distserve_kv_gather(cache.data(), message.data(), &l, ids.data(), num_ids, h0, h1,
                                   num_threads);
  expect(status == DISTSERVE_KV_OK, "gather status", case_no);
  expect(message == expected_message, "gathered bytes", case_no);

  message = random_bytes(message_bytes, 11u + static_cast<uint32_t>(case_no));
  auto expected_cache = cache;
  reference_copy(false, expected_cache, message, l, ids, h0, h1);
  status = distserve_kv_scatter(cache.data(), message.data(), &l, ids.data(), num_ids, h0, h1,
                                num_threads);
  expect(status == DISTSERVE_KV_OK, "scatter status", case_no);
  expect(cache == expected_cache, "scattered cache (every byte, touched or not)", case_no);
}

void check_bad_arguments() {
  const distserve_kv_layout l = {2, 2, 4, 2, 2, 4};
  std::vector<unsigned char> cache(static_cast<size_t>(2 * 2 * 4 * 2 * 2 * 4 * 2), 1);
  std::vector<unsigned char> message(static_cast<size_t>(2 * 2 * 2 * 2 * 2 * 4 * 2), 2);
  const auto untouched = message;
  const int64_t bad_ids[] = {1, 4};  // the second is past the last block
  expect(distserve_kv_gather(cache.data(), message.data(), &l, bad_ids, 2, 0, 2, 2) ==
             DISTSERVE_KV_BAD_BLOCK_ID,
         "id past the end", 100);
  expect(message == untouched, "a bad id copies nothing", 100);
  const int64_t negative_ids[] = {-1};
  expect(distserve_kv_scatter(cache.data(), message.data(), &l, negative_ids, 1, 0, 2, 1) ==
             DISTSERVE_KV_BAD_BLOCK_ID,
         "negative id", 101);
  const int64_t ids[] = {0, 3};
  expect(distserve_kv_gather(cache.data(), message.data(), &l, ids, 2, 1, 3, 1) ==
             DISTSERVE_KV_BAD_HEADS,
         "heads past the end", 102);
  expect(distserve_kv_gather(cache.data(), message.data(), &l, ids, 2, 1, 1, 1) ==
             DISTSERVE_KV_BAD_HEADS,
         "empty head range", 103);
  const distserve_kv_layout zero_blocks = {2, 2, 0, 2, 2, 4};
  expect(distserve_kv_gather(cache.data(), message.data(), &zero_blocks, ids, 2, 0, 2, 1) ==
             DISTSERVE_KV_BAD_LAYOUT,
         "empty cache", 104);
  expect(distserve_kv_gather(cache.data(), message.data(), &l, ids, 0, 0, 2, 4) == DISTSERVE_KV_OK,
         "no blocks is a no-op", 105);
  expect(message == untouched, "no blocks copies nothing", 105);
}

}  // namespace

int main() {
  expect(distserve_kv_abi_version() == DISTSERVE_KV_ABI_VERSION, "ABI version", 0);
  // {elem_bytes, num_layers, num_blocks, block_size, num_heads, head_dim}
  const distserve_kv_layout tiny = {2, 1, 8, 1, 1, 8};
  const distserve_kv_layout small = {4, 2, 16, 4, 4, 16};
  const distserve_kv_layout odd_rows = {2, 3, 9, 16, 8, 3};  // 6-byte heads
  const distserve_kv_layout parallel = {2, 4, 96, 16, 8, 64};  // >= 2 MB: runs on a team
  int case_no = 1;
  for (int num_threads : {1, 3}) {
    check_case(case_no++, tiny, 5, 0, 1, num_threads);
    check_case(case_no++, small, 16, 0, 4, num_threads);  // every block, every head
    check_case(case_no++, small, 7, 1, 3, num_threads);
    check_case(case_no++, small, 3, 3, 4, num_threads);
    check_case(case_no++, odd_rows, 5, 0, 8, num_threads);
    check_case(case_no++, odd_rows, 5, 2, 7, num_threads);
    check_case(case_no++, parallel, 80, 0, 8, num_threads);
    check_case(case_no++, parallel, 80, 4, 6, num_threads);
  }
  check_bad_arguments();
  if (g_num_failures) {
    std::fprintf(stderr, "kv_block_copy_test: %d failure(s)\n", g_num_failures);
    return 1;
  }
  std::printf("kv_block_copy_test: %d copy cases and the bad-argument checks passed\n",
              case_no - 1);
  return 0;
}
