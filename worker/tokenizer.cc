#include "worker/tokenizer.h"

#include <cmath>

namespace spotrain::worker {

std::vector<uint16_t> ByteTokenize(absl::string_view text) {
  std::vector<uint16_t> tokens(text.size());
  for (size_t i = 0; i < text.size(); ++i) tokens[i] = static_cast<unsigned char>(text[i]);
  return tokens;
}

std::string ByteDetokenize(absl::Span<const uint16_t> tokens) {
  std::string text(tokens.size(), '?');
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < kByteVocabSize) text[i] = static_cast<char>(tokens[i]);
  }
  return text;
}

double UnigramEntropyNats(absl::Span<const uint16_t> tokens) {
  std::vector<int64_t> counts(65536, 0);
  for (uint16_t t : tokens) ++counts[t];
  return UnigramEntropyNats(counts);
}

double UnigramEntropyNats(absl::Span<const int64_t> counts) {
  double total = 0;
  for (int64_t c : counts) total += static_cast<double>(c);
  if (total <= 0) return 0.0;
  double entropy = 0;
  for (int64_t c : counts) {
    if (c <= 0) continue;
    const double p = static_cast<double>(c) / total;
    entropy -= p * std::log(p);
  }
  return entropy;
}

}  // namespace spotrain::worker
