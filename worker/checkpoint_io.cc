#include "worker/checkpoint_io.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/file_util.h"
#include "common/hash.h"
#include "common/status_macros.h"
#include "google/protobuf/util/json_util.h"

// Payloads are the in-memory fp32 bytes; the format is little-endian.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "checkpoint format assumes little-endian");

namespace spotrain::worker {
namespace {

constexpr int64_t kHeaderChecksumOffset = 56;

void PutU32(char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
void PutU64(char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
uint32_t GetU32(const char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
uint64_t GetU64(const char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

absl::Status ErrnoError(absl::string_view what, const std::string& path, int err) {
  std::string message = absl::StrFormat("%s %s: %s", what, path, std::strerror(err));
  if (err == ENOENT) return absl::NotFoundError(message);
  if (err == ENOSPC || err == EDQUOT || err == EFBIG) return absl::ResourceExhaustedError(message);
  if (err == EACCES || err == EPERM || err == EROFS) return absl::PermissionDeniedError(message);
  return absl::InternalError(message);
}

// Keeps the code, puts `prefix` in front of the message.
absl::Status Annotate(const absl::Status& status, absl::string_view prefix) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(prefix, ": ", status.message()));
}

std::string BaseName(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  size_t slash = p.find_last_of('/');
  return slash == std::string::npos ? p : p.substr(slash + 1);
}

// Reads exactly `size` bytes at file offset `at`.
absl::Status ReadExactly(int fd, const std::string& path, int64_t at, char* out, int64_t size) {
  while (size > 0) {
    const size_t chunk = static_cast<size_t>(std::min<int64_t>(size, int64_t{1} << 30));
    ssize_t n = ::pread(fd, out, chunk, at);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("cannot read", path, errno);
    }
    if (n == 0) return absl::DataLossError(absl::StrCat(path, " ended early while reading"));
    out += n;
    at += n;
    size -= n;
  }
  return absl::OkStatus();
}

}  // namespace

std::string StepDirectoryName(int64_t step) { return absl::StrFormat("step-%08d", step); }

std::string StepDirectory(const std::string& checkpoint_root, int64_t step) {
  return common::JoinPath(checkpoint_root, StepDirectoryName(step));
}

std::string ShardFileName(int rank, int world_size) {
  return absl::StrFormat("shard-%05d-of-%05d.bin", rank, world_size);
}

int64_t ParseStepDirectoryName(absl::string_view name) {
  if (!absl::StartsWith(name, "step-") || name.size() < 13 || name.size() > 5 + 18) return -1;
  absl::string_view digits = name.substr(5);
  for (char c : digits) {
    if (c < '0' || c > '9') return -1;
  }
  int64_t step = -1;
  if (!absl::SimpleAtoi(digits, &step)) return -1;
  return step;
}

StateRange ShardRange(int64_t state_floats, int rank, int world_size) {
  // floor(r * S / W) = r * q + floor(r * m / W) with S = q * W + m: no overflow since
  // r * m < W^2 < 2^62.
  const int64_t w = world_size, q = state_floats / w, m = state_floats % w;
  auto begin = [&](int64_t r) { return r * q + (r * m) / w; };
  StateRange range;
  range.offset = begin(rank);
  range.length = begin(rank + 1) - range.offset;
  return range;
}

std::string EncodeShardHeader(const ShardHeader& header) {
  std::string bytes(kCheckpointHeaderBytes, '\0');
  char* p = bytes.data();
  std::memcpy(p, kCheckpointMagic, 8);
  PutU32(p + 8, kCheckpointFormatVersion);
  PutU32(p + 12, static_cast<uint32_t>(kCheckpointHeaderBytes));
  PutU64(p + 16, static_cast<uint64_t>(header.step));
  PutU64(p + 24, static_cast<uint64_t>(header.offset));
  PutU64(p + 32, static_cast<uint64_t>(header.length));
  PutU64(p + 40, static_cast<uint64_t>(header.state_floats));
  PutU64(p + 48, header.payload_xxh64);
  PutU64(p + kHeaderChecksumOffset, common::XxHash64(p, kHeaderChecksumOffset));
  return bytes;
}

absl::StatusOr<ShardHeader> DecodeShardHeader(absl::string_view bytes, absl::string_view what) {
  if (static_cast<int64_t>(bytes.size()) < kCheckpointHeaderBytes) {
    return absl::DataLossError(
        absl::StrFormat("%s: %d bytes, too short for a shard header", what, bytes.size()));
  }
  const char* p = bytes.data();
  if (std::memcmp(p, kCheckpointMagic, 8) != 0) {
    return absl::DataLossError(absl::StrCat(what, ": not a spotrain checkpoint shard (bad magic)"));
  }
  if (GetU64(p + kHeaderChecksumOffset) != common::XxHash64(p, kHeaderChecksumOffset)) {
    return absl::DataLossError(absl::StrCat(what, ": header checksum mismatch (corrupt header)"));
  }
  const uint32_t version = GetU32(p + 8);
  if (version != kCheckpointFormatVersion) {
    return absl::FailedPreconditionError(
        absl::StrFormat("%s: shard format version %d, this build reads version %d: restore it "
                        "with the spotrain release that wrote it",
                        what, version, kCheckpointFormatVersion));
  }
  if (GetU32(p + 12) != kCheckpointHeaderBytes) {
    return absl::DataLossError(absl::StrFormat("%s: header size %d, expected %d", what,
                                               GetU32(p + 12), kCheckpointHeaderBytes));
  }
  ShardHeader h;
  h.step = static_cast<int64_t>(GetU64(p + 16));
  h.offset = static_cast<int64_t>(GetU64(p + 24));
  h.length = static_cast<int64_t>(GetU64(p + 32));
  h.state_floats = static_cast<int64_t>(GetU64(p + 40));
  h.payload_xxh64 = GetU64(p + 48);
  if (h.step < 0 || h.offset < 0 || h.length < 0 || h.state_floats < 0 ||
      h.offset > h.state_floats || h.length > h.state_floats - h.offset) {
    return absl::DataLossError(absl::StrFormat(
        "%s: header fields out of range (step %d, offset %d, length %d, state_floats %d)", what,
        h.step, h.offset, h.length, h.state_floats));
  }
  return h;
}

absl::StatusOr<ShardFileInfo> WriteShardFile(const std::string& checkpoint_root, int64_t step,
                                             int rank, int world_size, int64_t state_floats,
                                             const float* payload) {
  if (world_size < 1 || rank < 0 || rank >= world_size || step < 0 || state_floats < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("bad checkpoint shard: step %d, rank %d of world size %d, %d floats", step,
                        rank, world_size, state_floats));
  }
  const std::string step_dir = StepDirectory(checkpoint_root, step);
  ShardFileInfo info;
  info.file = ShardFileName(rank, world_size);
  info.path = common::JoinPath(step_dir, info.file);
  const std::string context = absl::StrCat("cannot write checkpoint shard ", info.path);
  if (common::PathExists(common::JoinPath(step_dir, kManifestFileName))) {
    return absl::AlreadyExistsError(absl::StrFormat(
        "%s: checkpoint step %d is already committed (%s/%s exists); it is never overwritten",
        context, step, step_dir, kManifestFileName));
  }
  if (!common::PathExists(step_dir)) {
    RETURN_IF_ERROR(Annotate(common::MakeDirectories(step_dir), context));
    // The new directory entry must be durable before anything inside it is reported.
    RETURN_IF_ERROR(Annotate(common::FsyncDirectory(checkpoint_root), context));
  }
  const StateRange range = ShardRange(state_floats, rank, world_size);
  info.offset = range.offset;
  info.length = range.length;
  const size_t payload_bytes = static_cast<size_t>(range.length) * sizeof(float);
  info.checksum = common::XxHash64(payload, payload_bytes);
  info.checksum_hex = common::Hex64(info.checksum);
  ShardHeader header;
  header.step = step;
  header.offset = range.offset;
  header.length = range.length;
  header.state_floats = state_floats;
  header.payload_xxh64 = info.checksum;
  const std::string header_bytes = EncodeShardHeader(header);
  RETURN_IF_ERROR(Annotate(
      common::WriteFileAtomically(
          info.path,
          {header_bytes, absl::string_view(reinterpret_cast<const char*>(payload), payload_bytes)}),
      context));
  info.bytes = kCheckpointHeaderBytes + static_cast<int64_t>(payload_bytes);
  return info;
}

absl::Status ValidateManifest(const proto::Manifest& m) {
  auto bad = [&](const std::string& why) {
    return absl::DataLossError(absl::StrFormat("manifest of step %d: %s", m.step(), why));
  };
  if (m.step() < 0) return bad("negative step");
  if (m.state_floats() <= 0) return bad("state_floats must be positive");
  if (m.world_size() < 1) return bad(absl::StrCat("world_size ", m.world_size()));
  if (m.shards_size() != m.world_size()) {
    return bad(
        absl::StrFormat("lists %d shards for world_size %d", m.shards_size(), m.world_size()));
  }
  int64_t next = 0;
  for (int i = 0; i < m.shards_size(); ++i) {
    const proto::ShardInfo& s = m.shards(i);
    if (s.rank() != i) return bad(absl::StrFormat("shard %d has rank %d", i, s.rank()));
    if (s.file().empty() || s.file().find('/') != std::string::npos || s.file() == "." ||
        s.file() == "..") {
      return bad(absl::StrFormat("shard %d has file name \"%s\"", i, s.file()));
    }
    if (s.offset() != next) {
      return bad(absl::StrFormat("shard %d starts at %d, expected %d", i, s.offset(), next));
    }
    if (s.length() < 0 || s.length() > m.state_floats() - next) {
      return bad(absl::StrFormat("shard %d has length %d", i, s.length()));
    }
    if (s.checksum().empty()) return bad(absl::StrFormat("shard %d has no checksum", i));
    next += s.length();
  }
  if (next != m.state_floats()) {
    return bad(absl::StrFormat("shards cover %d of %d floats", next, m.state_floats()));
  }
  return absl::OkStatus();
}

absl::StatusOr<proto::Manifest> ReadManifest(const std::string& step_dir) {
  const std::string path = common::JoinPath(step_dir, kManifestFileName);
  auto json = common::ReadFile(path);
  if (!json.ok()) {
    if (absl::IsNotFound(json.status())) {
      return absl::NotFoundError(
          absl::StrCat(step_dir, " has no ", kManifestFileName, ": not a committed checkpoint"));
    }
    return json.status();
  }
  proto::Manifest manifest;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;
  auto parsed = google::protobuf::util::JsonStringToMessage(*json, &manifest, options);
  if (!parsed.ok()) {
    return absl::DataLossError(
        absl::StrCat(path, " is not a valid manifest: ", parsed.message().ToString()));
  }
  RETURN_IF_ERROR(Annotate(ValidateManifest(manifest), path));
  const int64_t named_step = ParseStepDirectoryName(BaseName(step_dir));
  if (named_step >= 0 && named_step != manifest.step()) {
    return absl::DataLossError(absl::StrFormat("%s says step %d, its directory step %d", path,
                                               manifest.step(), named_step));
  }
  return manifest;
}

absl::Status ReadShardFile(const std::string& step_dir, const proto::Manifest& manifest, int index,
                           float* out) {
  if (index < 0 || index >= manifest.shards_size()) {
    return absl::InvalidArgumentError(absl::StrCat("no shard ", index, " in the manifest"));
  }
  const proto::ShardInfo& info = manifest.shards(index);
  const std::string path = common::JoinPath(step_dir, info.file());
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("cannot open checkpoint shard", path, errno);
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};

  char header_bytes[kCheckpointHeaderBytes];
  struct stat st;
  if (::fstat(fd, &st) != 0) return ErrnoError("cannot stat", path, errno);
  const int64_t expected_size = kCheckpointHeaderBytes + info.length() * 4;
  if (st.st_size < kCheckpointHeaderBytes) {
    return absl::DataLossError(
        absl::StrFormat("%s is truncated: %d bytes, expected %d", path, st.st_size, expected_size));
  }
  RETURN_IF_ERROR(ReadExactly(fd, path, 0, header_bytes, kCheckpointHeaderBytes));
  ASSIGN_OR_RETURN(
      ShardHeader h,
      DecodeShardHeader(absl::string_view(header_bytes, kCheckpointHeaderBytes), path));
  if (h.step != manifest.step() || h.offset != info.offset() || h.length != info.length() ||
      h.state_floats != manifest.state_floats()) {
    return absl::DataLossError(absl::StrFormat(
        "%s holds step %d floats [%d, %d) of %d, the manifest expects step %d [%d, %d) of %d", path,
        h.step, h.offset, h.offset + h.length, h.state_floats, manifest.step(), info.offset(),
        info.offset() + info.length(), manifest.state_floats()));
  }
  if (st.st_size != expected_size) {
    return absl::DataLossError(absl::StrFormat(
        "%s is %s: %d bytes, expected %d", path,
        st.st_size < expected_size ? "truncated" : "too long", st.st_size, expected_size));
  }
  RETURN_IF_ERROR(
      ReadExactly(fd, path, kCheckpointHeaderBytes, reinterpret_cast<char*>(out), h.length * 4));
  const uint64_t sum = common::XxHash64(out, static_cast<size_t>(h.length) * 4);
  if (sum != h.payload_xxh64) {
    return absl::DataLossError(
        absl::StrFormat("%s: payload checksum %s does not match its header's %s (corrupt data)",
                        path, common::Hex64(sum), common::Hex64(h.payload_xxh64)));
  }
  if (!absl::EqualsIgnoreCase(common::Hex64(sum), info.checksum())) {
    return absl::DataLossError(
        absl::StrFormat("%s: payload checksum %s does not match the manifest's %s", path,
                        common::Hex64(sum), info.checksum()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<ShardSlice>> PlanStateRead(const proto::Manifest& manifest,
                                                      StateRange range) {
  if (range.offset < 0 || range.length < 0 || range.offset > manifest.state_floats() ||
      range.length > manifest.state_floats() - range.offset) {
    return absl::OutOfRangeError(absl::StrFormat("floats [%d, %d) are not inside a state of %d",
                                                 range.offset, range.end(),
                                                 manifest.state_floats()));
  }
  std::vector<ShardSlice> plan;
  for (int i = 0; i < manifest.shards_size(); ++i) {
    const proto::ShardInfo& s = manifest.shards(i);
    const int64_t begin = std::max(range.offset, s.offset());
    const int64_t end = std::min(range.end(), s.offset() + s.length());
    if (begin >= end) continue;
    ShardSlice slice;
    slice.shard_index = i;
    slice.shard_offset = begin - s.offset();
    slice.state_offset = begin;
    slice.length = end - begin;
    plan.push_back(slice);
  }
  return plan;
}

absl::Status ReadStateRange(const std::string& step_dir, const proto::Manifest& manifest,
                            StateRange range, float* out, ReadStats* stats) {
  ASSIGN_OR_RETURN(std::vector<ShardSlice> plan, PlanStateRead(manifest, range));
  std::vector<float> scratch;
  for (const ShardSlice& slice : plan) {
    const proto::ShardInfo& info = manifest.shards(slice.shard_index);
    float* dest = out + (slice.state_offset - range.offset);
    if (slice.length == info.length()) {
      RETURN_IF_ERROR(ReadShardFile(step_dir, manifest, slice.shard_index, dest));
    } else {
      scratch.resize(static_cast<size_t>(info.length()));
      RETURN_IF_ERROR(ReadShardFile(step_dir, manifest, slice.shard_index, scratch.data()));
      std::memcpy(dest, scratch.data() + slice.shard_offset, slice.length * sizeof(float));
    }
    if (stats != nullptr) {
      stats->bytes_read += kCheckpointHeaderBytes + info.length() * 4;
      ++stats->shards_read;
    }
  }
  return absl::OkStatus();
}

absl::Status ForEachShard(const std::string& step_dir, const proto::Manifest& manifest,
                          const ShardSink& sink, ReadStats* stats) {
  std::vector<float> buffer;
  for (int i = 0; i < manifest.shards_size(); ++i) {
    const proto::ShardInfo& info = manifest.shards(i);
    buffer.resize(static_cast<size_t>(info.length()));
    RETURN_IF_ERROR(ReadShardFile(step_dir, manifest, i, buffer.data()));
    if (stats != nullptr) {
      stats->bytes_read += kCheckpointHeaderBytes + info.length() * 4;
      ++stats->shards_read;
    }
    RETURN_IF_ERROR(sink(info.offset(), buffer.data(), info.length()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ComputeStateDigest(const std::string& step_dir,
                                               const proto::Manifest& manifest, ReadStats* stats) {
  common::Sha256 sha;
  RETURN_IF_ERROR(ForEachShard(
      step_dir, manifest,
      [&](int64_t, const float* data, int64_t length) {
        sha.Update(data, static_cast<size_t>(length) * sizeof(float));
        return absl::OkStatus();
      },
      stats));
  const int64_t step = manifest.step();
  sha.Update(&step, sizeof(step));
  return sha.HexDigest();
}

std::vector<int64_t> ListCommittedSteps(const std::string& checkpoint_root) {
  std::vector<int64_t> steps;
  DIR* dir = ::opendir(checkpoint_root.c_str());
  if (dir == nullptr) return steps;
  while (dirent* e = ::readdir(dir)) {
    const int64_t step = ParseStepDirectoryName(e->d_name);
    if (step < 0) continue;
    const std::string manifest =
        common::JoinPath(common::JoinPath(checkpoint_root, e->d_name), kManifestFileName);
    struct stat st;
    if (::stat(manifest.c_str(), &st) == 0 && S_ISREG(st.st_mode)) steps.push_back(step);
  }
  ::closedir(dir);
  std::sort(steps.rbegin(), steps.rend());
  return steps;
}

}  // namespace spotrain::worker
