// The byte-level tokenizer of `spotrain prepare-data`: every byte of the text is one token
// (vocab 256), so any file can be tokenized and any token sequence decoded without a
// vocabulary file. Also the corpus statistic prepare-data reports: the unigram entropy, the
// loss a model reaches by predicting the token frequencies alone (a baseline that training
// must beat). Pure functions; thread-safe.
#ifndef SPOTRAIN_WORKER_TOKENIZER_H_
#define SPOTRAIN_WORKER_TOKENIZER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace spotrain::worker {

inline constexpr int kByteVocabSize = 256;

// One token per byte, in order.
std::vector<uint16_t> ByteTokenize(absl::string_view text);

// The inverse of ByteTokenize. Tokens >= 256 (from another tokenizer) come out as '?'.
std::string ByteDetokenize(absl::Span<const uint16_t> tokens);

// -sum_t p(t) ln p(t) over the empirical token frequencies, in nats per token; 0 for an
// empty input.
double UnigramEntropyNats(absl::Span<const uint16_t> tokens);
// The same from a histogram of token counts.
double UnigramEntropyNats(absl::Span<const int64_t> counts);

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_TOKENIZER_H_
