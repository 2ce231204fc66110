#include "common/run_config.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/file_util.h"
#include "common/hash.h"
#include "common/model_presets.h"
#include "common/status_macros.h"
#include "google/protobuf/util/json_util.h"

namespace spotrain::common {
namespace {

absl::Status Invalid(absl::string_view field, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat("config field ", field, ": ", problem));
}

}  // namespace

void ApplyDefaults(proto::RunConfig& c) {
  if (c.model().empty()) c.set_model("gpt-tiny");
  if (c.seq_len() == 0) {
    auto model = ModelConfigForPreset(c.model());
    if (model.ok()) c.set_seq_len(model->max_seq_len());
  }
  if (c.micro_batch() == 0) c.set_micro_batch(1);
  if (c.global_batch() == 0) c.set_global_batch(8 * c.micro_batch());
  if (!c.has_seed()) c.set_seed(1337);
  proto::OptimizerConfig* o = c.mutable_optimizer();
  if (!o->has_lr()) o->set_lr(1e-3f);
  if (!o->has_warmup_steps()) {
    o->set_warmup_steps(static_cast<int32_t>(std::min<int64_t>(100, c.steps() / 10)));
  }
  if (!o->has_weight_decay()) o->set_weight_decay(0.1f);
  if (!o->has_grad_clip()) o->set_grad_clip(1.0f);
  if (!o->has_beta1()) o->set_beta1(0.9f);
  if (!o->has_beta2()) o->set_beta2(0.95f);
  if (!o->has_eps()) o->set_eps(1e-8f);
  if (!o->has_min_lr_fraction()) o->set_min_lr_fraction(0.1f);
  if (!c.has_eval_every()) c.set_eval_every(50);
  if (!c.has_eval_batches()) c.set_eval_batches(8);
  proto::CheckpointConfig* ck = c.mutable_checkpoint();
  if (!ck->has_every_steps()) ck->mutable_every_steps()->set_number_value(50);
  if (!ck->has_keep()) ck->set_keep(3);
  if (!ck->has_mtbf_prior_s()) ck->set_mtbf_prior_s(3600);
  if (!c.has_min_workers()) c.set_min_workers(1);
  if (!c.has_max_workers()) c.set_max_workers(64);
  if (!c.has_heartbeat_ms()) c.set_heartbeat_ms(500);
  if (!c.has_heartbeat_timeout_ms()) c.set_heartbeat_timeout_ms(5000);
  if (!c.has_threads()) c.set_threads(1);
  if (!c.has_log_every()) c.set_log_every(1);
  if (c.precision().empty()) c.set_precision("fp32");
  if (!c.has_join_settle_ms()) c.set_join_settle_ms(1000);
  if (!c.has_op_timeout_ms()) c.set_op_timeout_ms(10000);
}

absl::Status ValidateRunConfig(const proto::RunConfig& c) {
  ASSIGN_OR_RETURN(proto::ModelConfig model, ModelConfigForPreset(c.model()));
  if (c.data().train().empty()) {
    return Invalid("data.train",
                   "missing: give a glob of .bin token shards "
                   "(spotrain prepare-data writes them)");
  }
  if (c.data().val().empty()) {
    return Invalid("data.val", "missing: give a glob of .bin token shards for evaluation");
  }
  if (c.seq_len() < 1 || c.seq_len() > model.max_seq_len()) {
    return Invalid("seq_len", absl::StrFormat("%d is outside 1..%d (the context of %s)",
                                              c.seq_len(), model.max_seq_len(), c.model()));
  }
  if (c.micro_batch() < 1) return Invalid("micro_batch", "must be at least 1");
  if (c.global_batch() < 1) return Invalid("global_batch", "must be at least 1");
  if (c.global_batch() % c.micro_batch() != 0) {
    return Invalid("global_batch", absl::StrFormat("%d is not a multiple of micro_batch %d",
                                                   c.global_batch(), c.micro_batch()));
  }
  if (c.steps() < 1) return Invalid("steps", "must be at least 1");
  const proto::OptimizerConfig& o = c.optimizer();
  if (!(o.lr() > 0) || !std::isfinite(o.lr())) {
    return Invalid("optimizer.lr", "must be a positive number");
  }
  if (o.warmup_steps() < 0) return Invalid("optimizer.warmup_steps", "must be >= 0");
  if (o.weight_decay() < 0) return Invalid("optimizer.weight_decay", "must be >= 0");
  if (o.grad_clip() < 0) return Invalid("optimizer.grad_clip", "must be >= 0 (0 disables)");
  if (!(o.beta1() >= 0 && o.beta1() < 1)) return Invalid("optimizer.beta1", "must be in [0, 1)");
  if (!(o.beta2() >= 0 && o.beta2() < 1)) return Invalid("optimizer.beta2", "must be in [0, 1)");
  if (!(o.eps() > 0)) return Invalid("optimizer.eps", "must be positive");
  if (!(o.min_lr_fraction() >= 0 && o.min_lr_fraction() <= 1)) {
    return Invalid("optimizer.min_lr_fraction", "must be in [0, 1]");
  }
  if (c.eval_every() < 0) return Invalid("eval_every", "must be >= 0 (0: only at the end)");
  if (c.eval_batches() < 1) return Invalid("eval_batches", "must be at least 1");
  const proto::CheckpointConfig& ck = c.checkpoint();
  const google::protobuf::Value& every = ck.every_steps();
  if (every.kind_case() == google::protobuf::Value::kStringValue) {
    if (every.string_value() != "auto") {
      return Invalid("checkpoint.every_steps",
                     absl::StrCat("\"", every.string_value(),
                                  "\" is neither a positive number of steps nor \"auto\""));
    }
  } else if (every.kind_case() == google::protobuf::Value::kNumberValue) {
    double n = every.number_value();
    if (!(n >= 1) || n != std::floor(n) || n > 1e12) {
      return Invalid("checkpoint.every_steps", "must be a positive whole number or \"auto\"");
    }
  } else {
    return Invalid("checkpoint.every_steps", "must be a positive whole number or \"auto\"");
  }
  if (ck.keep() < 1) return Invalid("checkpoint.keep", "must be at least 1");
  if (!(ck.mtbf_prior_s() > 0)) return Invalid("checkpoint.mtbf_prior_s", "must be positive");
  if (c.min_workers() < 1) return Invalid("min_workers", "must be at least 1");
  if (c.max_workers() < c.min_workers()) {
    return Invalid("max_workers",
                   absl::StrFormat("%d is below min_workers %d", c.max_workers(), c.min_workers()));
  }
  if (c.heartbeat_ms() < 10) return Invalid("heartbeat_ms", "must be at least 10");
  if (c.heartbeat_timeout_ms() <= c.heartbeat_ms()) {
    return Invalid("heartbeat_timeout_ms",
                   absl::StrFormat("%d must exceed heartbeat_ms %d", c.heartbeat_timeout_ms(),
                                   c.heartbeat_ms()));
  }
  if (c.threads() < 1 || c.threads() > 256) return Invalid("threads", "must be in 1..256");
  if (c.log_every() < 1) return Invalid("log_every", "must be at least 1");
  if (c.precision() != "fp32" && c.precision() != "bf16") {
    return Invalid("precision", absl::StrCat("\"", c.precision(), "\" is not fp32 or bf16"));
  }
  if (c.join_settle_ms() < 0) return Invalid("join_settle_ms", "must be >= 0");
  if (c.op_timeout_ms() < 100) return Invalid("op_timeout_ms", "must be at least 100");
  return absl::OkStatus();
}

absl::StatusOr<proto::RunConfig> ParseRunConfig(const std::string& json) {
  proto::RunConfig config;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;
  auto status = google::protobuf::util::JsonStringToMessage(json, &config, options);
  if (!status.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("run config is not valid: ", std::string(status.message()),
                     " (field names are snake_case, e.g. \"global_batch\")"));
  }
  ApplyDefaults(config);
  RETURN_IF_ERROR(ValidateRunConfig(config));
  return config;
}

absl::StatusOr<proto::RunConfig> LoadRunConfig(const std::string& path) {
  ASSIGN_OR_RETURN(std::string json, ReadFile(path));
  auto config = ParseRunConfig(json);
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat(path, ": ", config.status().message()));
  }
  return config;
}

proto::RunConfig DefaultRunConfig(const std::string& data_dir) {
  proto::RunConfig c;
  c.set_model("gpt-tiny");
  c.mutable_data()->set_train(JoinPath(data_dir, "train_*.bin"));
  c.mutable_data()->set_val(JoinPath(data_dir, "val_*.bin"));
  c.set_seq_len(128);
  c.set_global_batch(8);
  c.set_micro_batch(2);
  c.set_steps(300);
  c.mutable_optimizer()->set_lr(3e-3f);
  c.mutable_optimizer()->set_warmup_steps(20);
  c.set_eval_every(50);
  ApplyDefaults(c);
  return c;
}

int64_t FixedCheckpointInterval(const proto::RunConfig& c) {
  if (c.checkpoint().dir().empty()) return 0;
  const auto& every = c.checkpoint().every_steps();
  if (every.kind_case() != google::protobuf::Value::kNumberValue) return 0;
  return static_cast<int64_t>(every.number_value());
}

bool AutoCheckpointInterval(const proto::RunConfig& c) {
  return !c.checkpoint().dir().empty() &&
         c.checkpoint().every_steps().kind_case() == google::protobuf::Value::kStringValue;
}

std::string RunConfigToJson(const proto::RunConfig& config) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(config, &json, options);
  return json;
}

uint64_t RunFingerprint(const proto::RunConfig& config) {
  proto::RunConfig math;
  math.set_model(config.model());
  *math.mutable_data() = config.data();
  math.set_seq_len(config.seq_len());
  math.set_global_batch(config.global_batch());
  math.set_micro_batch(config.micro_batch());
  math.set_steps(config.steps());
  math.set_seed(config.seed());
  *math.mutable_optimizer() = config.optimizer();
  math.set_deterministic(config.deterministic());
  std::string bytes;
  math.SerializeToString(&bytes);  // deterministic enough: no maps in RunConfig.
  return XxHash64(bytes.data(), bytes.size());
}

}  // namespace spotrain::common
