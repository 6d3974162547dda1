// First-fit-decreasing pack planner: see pack.h for layouts and the policy.
//
// Finding "the first sequence with room" uses a max tree over the sequences (bins): each node
// holds the largest remaining token room and the largest remaining patch room below it. A
// subtree can hold the sample only if both maxima are large enough, so the search descends
// leftmost into subtrees passing both tests and backtracks when a subtree passes on its maxima
// (one bin with token room, another with patch room) but no single bin fits. That keeps the
// search exact (it never misses a fitting bin and never over-fills one). With one binding
// constraint it is O(log bins) per sample; when both bind, a query can visit more nodes (worst
// case O(bins)), which in practice only happens near the end of image-heavy plans.
//
// Bins not opened yet sit in the tree as empty bins, after all opened ones: the first fit is
// then always found by the search (every placed sample fits an empty bin), and a sample that
// fits no opened bin lands in the lowest unopened one, i.e. opens the next bin in order.
// An update stops climbing at the first ancestor whose maxima do not change, which is most of
// them: most samples go into bins that are not the roomiest.
#include "pack.h"

#include <algorithm>
#include <limits>
#include <stdexcept>

namespace megatron_navil {
namespace {

constexpr int64_t kNoLimit = std::numeric_limits<int64_t>::max();
constexpr const char* kOp = "plan_packing";

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument(std::string(kOp) + ": " + msg);
}

std::string limit_str(int64_t max_patches) {
  return max_patches == kNoLimit ? "None" : std::to_string(max_patches);
}

// Max tree over bins' remaining (tokens, patches, cost) room. Every leaf is a bin: the opened ones
// first, then empty ones; the tree doubles when the last empty leaf is opened, so its size
// follows the number of sequences (amortised O(1) per bin), not the number of samples.
class BinTree {
 public:
  BinTree(int64_t token_room, int64_t patch_room, int64_t cost_room)
      : empty_{token_room, patch_room, cost_room} {
    grow(1024);
  }

  // Lowest bin with room for (t, p, c); -1 only for a sample larger than an empty bin.
  int64_t first_fit(int64_t t, int64_t p, int64_t c) const {
    if (!fits(1, t, p, c)) return -1;
    int64_t node = 1;
    while (node < leaves_) {
      const int64_t left = 2 * node;
      if (fits(left, t, p, c)) {
        node = left;
      } else if (fits(left + 1, t, p, c)) {
        node = left + 1;
      } else {
        // Both maxima passed here but no child fits: go back up to the nearest left child
        // whose right sibling passes and continue there.
        for (;;) {
          if (node == 1) return -1;
          if ((node & 1) == 0 && fits(node + 1, t, p, c)) {
            node = node + 1;
            break;
          }
          node >>= 1;
        }
      }
    }
    return node - leaves_;  // a leaf that passed both tests: this bin fits
  }

  void take(int64_t bin, int64_t t, int64_t p, int64_t c) {
    int64_t node = leaves_ + bin;
    room_[node].tokens -= t;
    room_[node].patches -= p;
    room_[node].cost -= c;
    for (node >>= 1; node >= 1; node >>= 1) {
      const Room before = room_[node];
      pull(node);
      if (room_[node].tokens == before.tokens && room_[node].patches == before.patches &&
          room_[node].cost == before.cost) {
        break;
      }
    }
    if (bin == leaves_ - 1) grow(2 * leaves_);  // keep an empty bin after the opened ones
  }

 private:
  struct Room {
    int64_t tokens;
    int64_t patches;
    int64_t cost;
  };

  void grow(int64_t leaves) {
    std::vector<Room> room(static_cast<size_t>(2 * leaves), empty_);
    if (!room_.empty()) {
      std::copy(room_.begin() + leaves_, room_.end(), room.begin() + leaves);
    }
    room_.swap(room);
    leaves_ = leaves;
    for (int64_t node = leaves_ - 1; node >= 1; --node) pull(node);
  }
  bool fits(int64_t node, int64_t t, int64_t p, int64_t c) const {
    return room_[node].tokens >= t && room_[node].patches >= p && room_[node].cost >= c;
  }
  void pull(int64_t node) {
    const Room& a = room_[2 * node];
    const Room& b = room_[2 * node + 1];
    room_[node] = {std::max(a.tokens, b.tokens), std::max(a.patches, b.patches),
                   std::max(a.cost, b.cost)};
  }

  Room empty_;
  int64_t leaves_ = 0;
  std::vector<Room> room_;
};

struct Item {
  int64_t tokens;
  int64_t patches;
  int64_t cost;
  int64_t index;
};

}  // namespace

PackPlan plan_packing_ffd(const int64_t* llm_tokens, const int64_t* patches, int64_t n,
                          int64_t seq_length, int64_t max_patches, bool skip_oversize,
                          const int64_t* costs, int64_t max_cost) {
  if (seq_length <= 0) {
    fail("seq_length must be a positive integer, got " + std::to_string(seq_length));
  }
  if (max_patches <= 0) {
    fail("max_patches must be a positive integer or None, got " + std::to_string(max_patches));
  }
  // Same checks in the same order as the Python front: tokens, then patches, then size.
  for (int64_t i = 0; i < n; ++i) {
    if (llm_tokens[i] < 1) {
      fail("llm_tokens[" + std::to_string(i) + "] = " + std::to_string(llm_tokens[i]) +
           ": every sample needs at least 1 LLM token");
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    if (patches[i] < 0) {
      fail("patches[" + std::to_string(i) + "] = " + std::to_string(patches[i]) +
           " is negative");
    }
  }
  if (max_cost <= 0) {
    fail("max_cost must be a positive integer or None, got " + std::to_string(max_cost));
  }
  for (int64_t i = 0; costs != nullptr && i < n; ++i) {
    if (costs[i] < 0 || costs[i] > max_cost) {
      fail("costs[" + std::to_string(i) + "] = " + std::to_string(costs[i]) +
           " must be in [0, max_cost]");
    }
  }
  PackPlan plan;
  std::vector<Item> items;
  items.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    if (llm_tokens[i] > seq_length || patches[i] > max_patches) {
      if (!skip_oversize) {
        fail("sample " + std::to_string(i) + " does not fit in one sequence (llm_tokens=" +
             std::to_string(llm_tokens[i]) + ", patches=" + std::to_string(patches[i]) +
             "; seq_length=" + std::to_string(seq_length) +
             ", max_patches=" + limit_str(max_patches) +
             "); pass oversize='skip' to leave such samples out");
      }
      plan.skipped.push_back(i);
    } else {
      items.push_back({llm_tokens[i], patches[i], costs == nullptr ? 0 : costs[i], i});
    }
  }
  // A strict total order (index breaks every tie): std::sort's result is unique.
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    if (a.tokens != b.tokens) return a.tokens > b.tokens;
    if (a.patches != b.patches) return a.patches > b.patches;
    return a.index < b.index;
  });

  const auto m = static_cast<int64_t>(items.size());
  BinTree tree(seq_length, max_patches, max_cost);
  std::vector<int64_t> bin_of(static_cast<size_t>(n), -1);
  int64_t num_bins = 0;
  for (const Item& item : items) {
    const int64_t bin = tree.first_fit(item.tokens, item.patches, item.cost);
    if (bin < 0) fail("internal error: no bin found for sample " + std::to_string(item.index));
    tree.take(bin, item.tokens, item.patches, item.cost);
    bin_of[item.index] = bin;
    num_bins = std::max(num_bins, bin + 1);
  }

  // CSR by counting sort over bins; visiting samples by ascending index keeps each sequence's
  // samples ascending.
  plan.seq_offsets.assign(static_cast<size_t>(num_bins) + 1, 0);
  plan.tokens_per_seq.assign(static_cast<size_t>(num_bins), 0);
  plan.patches_per_seq.assign(static_cast<size_t>(num_bins), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t bin = bin_of[i];
    if (bin < 0) continue;
    ++plan.seq_offsets[bin + 1];
    plan.tokens_per_seq[bin] += llm_tokens[i];  // <= seq_length: no overflow
    plan.patches_per_seq[bin] += patches[i];    // <= max_patches
  }
  for (int64_t j = 0; j < num_bins; ++j) plan.seq_offsets[j + 1] += plan.seq_offsets[j];
  plan.sample_ids.resize(static_cast<size_t>(m));
  std::vector<int64_t> cursor(plan.seq_offsets.begin(), plan.seq_offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t bin = bin_of[i];
    if (bin >= 0) plan.sample_ids[cursor[bin]++] = i;
  }
  return plan;
}

namespace {

const int64_t* check_counts(const char* name, const torch::Tensor& t) {
  if (t.dim() != 1 || t.scalar_type() != at::kLong || !t.device().is_cpu() ||
      !t.is_contiguous()) {
    fail(std::string(name) + " must be a contiguous 1-D int64 CPU tensor");
  }
  return t.data_ptr<int64_t>();
}

torch::Tensor to_tensor(const std::vector<int64_t>& v) {
  auto out = torch::empty({static_cast<int64_t>(v.size())}, torch::dtype(at::kLong));
  std::copy(v.begin(), v.end(), out.data_ptr<int64_t>());
  return out;
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>
plan_packing(const torch::Tensor& llm_tokens, const torch::Tensor& patches, int64_t seq_length,
             std::optional<int64_t> max_patches, const std::string& oversize,
             const std::optional<torch::Tensor>& costs, std::optional<int64_t> max_cost) {
  const int64_t* tok = check_counts("llm_tokens", llm_tokens);
  const int64_t* pat = check_counts("patches", patches);
  if (llm_tokens.numel() != patches.numel()) {
    fail("llm_tokens and patches must have the same length, got " +
         std::to_string(llm_tokens.numel()) + " and " + std::to_string(patches.numel()));
  }
  if (oversize != "error" && oversize != "skip") {
    fail("oversize must be 'error' or 'skip', got '" + oversize + "'");
  }
  const int64_t* cost = nullptr;
  if (costs.has_value()) {
    cost = check_counts("costs", *costs);
    if (costs->numel() != llm_tokens.numel()) {
      fail("costs must have one entry per sample, got " + std::to_string(costs->numel()));
    }
  }
  const PackPlan plan =
      plan_packing_ffd(tok, pat, llm_tokens.numel(), seq_length, max_patches.value_or(kNoLimit),
                       oversize == "skip", cost, max_cost.value_or(kNoLimit));
  return {to_tensor(plan.seq_offsets), to_tensor(plan.sample_ids),
          to_tensor(plan.tokens_per_seq), to_tensor(plan.patches_per_seq),
          to_tensor(plan.skipped)};
}

}  // namespace megatron_navil
