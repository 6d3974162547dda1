// Sequence pack planner: assigns samples to packed sequences of at most seq_length LLM tokens
// and at most max_patches vision-encoder patches, by first-fit decreasing (FFD).
//
// Layouts (n samples, m = n - skipped placed, S sequences):
//   llm_tokens       [n] int64: each sample's LLM tokens (text + its image blocks), >= 1
//   patches          [n] int64: each sample's vision-encoder patches (all images and scales), >= 0
//   seq_offsets      [S + 1] int64: CSR offsets into sample_ids, 0 first, m last
//   sample_ids       [m] int64: samples of sequence j are sample_ids[seq_offsets[j]:
//                    seq_offsets[j + 1]], ascending original index inside a sequence
//   tokens_per_seq   [S] int64: sum of llm_tokens of each sequence's samples (<= seq_length)
//   patches_per_seq  [S] int64: sum of patches of each sequence's samples (<= max_patches)
//   skipped          [k] int64: ascending indices of samples larger than a whole sequence
//                    (only with oversize "skip"; "error" throws for the first one instead)
//
// Policy: samples sorted by llm_tokens descending, then patches descending, then index
// ascending (a strict total order, so the sort is deterministic); each goes into the first
// (lowest-numbered) sequence with room for both its tokens and its patches, a new sequence when
// none has. Sequences are numbered in the order they were opened, i.e. by their first sample in
// that sorted order. Integer arithmetic only, one thread: the same input gives the same plan on
// every machine. megatron_navil/ops/pack.py has the pure-Python reference (a linear scan) and
// the tests check the two agree exactly.
//
// Errors: std::invalid_argument (ValueError in Python) with the Python front's messages.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace megatron_navil {

// The plan in plain vectors (see the layouts above).
struct PackPlan {
  std::vector<int64_t> seq_offsets;
  std::vector<int64_t> sample_ids;
  std::vector<int64_t> tokens_per_seq;
  std::vector<int64_t> patches_per_seq;
  std::vector<int64_t> skipped;
};

// The algorithm, torch-free. max_patches = INT64_MAX means no patch limit.
// costs (nullable: all 0) [n] int64 in [0, max_cost]: a third budget, max_cost per sequence
// (INT64_MAX: no limit); the sort order does not look at it.
PackPlan plan_packing_ffd(const int64_t* llm_tokens, const int64_t* patches, int64_t n,
                          int64_t seq_length, int64_t max_patches, bool skip_oversize,
                          const int64_t* costs = nullptr,
                          int64_t max_cost = std::numeric_limits<int64_t>::max());

// Binding entry: 1-D int64 CPU tensors in, (seq_offsets, sample_ids, tokens_per_seq,
// patches_per_seq, skipped) int64 tensors out. max_patches nullopt = no limit; oversize is
// "error" or "skip"; costs / max_cost: the optional third budget (nullopt: none).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>
plan_packing(const torch::Tensor& llm_tokens, const torch::Tensor& patches, int64_t seq_length,
             std::optional<int64_t> max_patches, const std::string& oversize,
             const std::optional<torch::Tensor>& costs, std::optional<int64_t> max_cost);

}  // namespace megatron_navil
