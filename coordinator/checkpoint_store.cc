#include "coordinator/checkpoint_store.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "coordinator/planner.h"
#include "google/protobuf/util/json_util.h"

namespace spotrain::coordinator {
namespace {

constexpr char kManifest[] = "manifest.json";

// step-%08d (exactly "step-" and digits) -> step, else -1.
int64_t ParseStepName(const std::string& name) {
  if (!absl::StartsWith(name, "step-") || name.size() < 13) return -1;
  int64_t step = -1;
  const std::string digits = name.substr(5);
  for (char c : digits) {
    if (c < '0' || c > '9') return -1;
  }
  if (!absl::SimpleAtoi(digits, &step)) return -1;
  return step;
}

std::vector<std::string> ListDirectory(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return names;
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(d);
  return names;
}

}  // namespace

std::string ManifestToJson(const proto::Manifest& manifest) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(manifest, &json, options);
  return json;
}

absl::StatusOr<proto::Manifest> ParseManifest(const std::string& json) {
  proto::Manifest manifest;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;
  auto status = google::protobuf::util::JsonStringToMessage(json, &manifest, options);
  if (!status.ok()) {
    return absl::DataLossError(
        absl::StrCat("manifest is not valid JSON: ", status.message().ToString()));
  }
  return manifest;
}

absl::Status WriteManifest(const std::string& checkpoint_dir, const proto::Manifest& manifest) {
  const std::string step_dir = StepDirectory(checkpoint_dir, manifest.step());
  for (const proto::ShardInfo& shard : manifest.shards()) {
    const std::string path = common::JoinPath(step_dir, shard.file());
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "shard %s is missing (%s): is the checkpoint directory shared with the workers?", path,
          std::strerror(errno)));
    }
    if (st.st_size < shard.length() * static_cast<int64_t>(sizeof(float))) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "shard %s holds %d bytes, less than its %d floats", path, st.st_size, shard.length()));
    }
  }
  return common::WriteFileAtomically(common::JoinPath(step_dir, kManifest),
                                     ManifestToJson(manifest));
}

absl::Status DeleteStepDirectory(const std::string& checkpoint_dir, int64_t step) {
  const std::string step_dir = StepDirectory(checkpoint_dir, step);
  const std::string manifest = common::JoinPath(step_dir, kManifest);
  if (::unlink(manifest.c_str()) == 0) {
    RETURN_IF_ERROR(common::FsyncDirectory(step_dir));
  } else if (errno != ENOENT) {
    return absl::InternalError(
        absl::StrFormat("cannot delete %s: %s", manifest, std::strerror(errno)));
  }
  for (const std::string& name : ListDirectory(step_dir)) {
    const std::string path = common::JoinPath(step_dir, name);
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      return absl::InternalError(
          absl::StrFormat("cannot delete %s: %s", path, std::strerror(errno)));
    }
  }
  if (::rmdir(step_dir.c_str()) != 0 && errno != ENOENT) {
    return absl::InternalError(
        absl::StrFormat("cannot remove %s: %s", step_dir, std::strerror(errno)));
  }
  return common::FsyncDirectory(checkpoint_dir);
}

std::vector<int64_t> PruneStepDirectories(const std::string& checkpoint_dir, int64_t below_step,
                                          const std::set<int64_t>& keep) {
  std::vector<int64_t> deleted;
  for (const std::string& name : ListDirectory(checkpoint_dir)) {
    const int64_t step = ParseStepName(name);
    if (step < 0 || step >= below_step || keep.count(step)) continue;
    absl::Status s = DeleteStepDirectory(checkpoint_dir, step);
    if (s.ok()) {
      deleted.push_back(step);
    } else {
      SPOTRAIN_LOG(Warning, "pruning checkpoint step %d: %s", step, std::string(s.message()));
    }
  }
  return deleted;
}

std::vector<int64_t> FindCommittedSteps(const std::string& checkpoint_dir,
                                        uint64_t run_fingerprint) {
  std::set<int64_t> steps;
  for (const std::string& name : ListDirectory(checkpoint_dir)) {
    const int64_t step = ParseStepName(name);
    if (step < 0) continue;
    auto json =
        common::ReadFile(common::JoinPath(common::JoinPath(checkpoint_dir, name), kManifest));
    if (!json.ok()) continue;
    auto manifest = ParseManifest(*json);
    if (!manifest.ok() || manifest->step() != step) {
      SPOTRAIN_LOG(Warning, "%s/%s/manifest.json is not a valid manifest; ignoring it",
                   checkpoint_dir, name);
      continue;
    }
    if (manifest->run_fingerprint() != run_fingerprint) continue;
    steps.insert(step);
  }
  return std::vector<int64_t>(steps.begin(), steps.end());
}

}  // namespace spotrain::coordinator
