// A persistent pool of worker threads shared by training and batch encoding (spawning threads per call costs
// more than encoding a short batch).
#pragma once

#include <functional>

namespace fastlm::bpe {

// 0 means "all cores".
int resolve_num_threads(int num_threads);

// Runs task(0) .. task(num_tasks - 1), the caller's thread taking part; returns when all are done. Calls from
// several threads at once are run one after the other. An exception thrown by a task is rethrown here (the first
// one by task index), after every task has finished.
void parallel_for(int num_tasks, const std::function<void(int)>& task);

}  // namespace fastlm::bpe
