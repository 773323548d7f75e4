// Splitting a kernel's tasks between threads by their cost, for the attention kernels
// (paged_attention.cpp, paged_attention_amx.cpp): a decode step's requests hold from tens to
// thousands of keys each, so equal numbers of tasks per thread can leave one thread idle for most
// of the call.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace helix_tasks {
namespace {

// Bounds of `runs` consecutive runs of tasks of about equal total cost: run t is tasks
// [bounds[t], bounds[t + 1]). Each boundary goes where the running cost comes closest to its share.
inline std::vector<int64_t> balanced_runs(const std::vector<int64_t>& costs, int64_t runs) {
  const int64_t tasks = static_cast<int64_t>(costs.size());
  int64_t total = 0;
  for (int64_t c : costs) total += c;
  std::vector<int64_t> bounds(runs + 1, tasks);
  bounds[0] = 0;
  int64_t task = 0, done = 0;
  for (int64_t t = 1; t < runs; ++t) {
    const int64_t share = total * t / runs;  // the cost that runs 0 .. t - 1 should cover
    // Take the next task while that brings the running cost nearer to the share.
    while (task < tasks && done + costs[task] - share <= share - done) done += costs[task++];
    bounds[t] = task;
  }
  return bounds;
}

// run(begin, end) for runs of tasks [begin, end) that together cover every task once, split
// between torch's threads by `costs` (one run a thread).
template <typename Run>
void for_each_task_balanced(const std::vector<int64_t>& costs, const Run& run) {
  const int64_t runs = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(costs.size())));
  const std::vector<int64_t> bounds = balanced_runs(costs, runs);
  at::parallel_for(0, runs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) run(bounds[r], bounds[r + 1]);
  });
}

}  // namespace
}  // namespace helix_tasks
