#include "worker/coordinator_client.h"

#include <cstdlib>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/status_macros.h"

namespace spotrain::worker {
namespace {

constexpr char kTokenHeader[] = "x-spotrain-token";

absl::Status FromGrpc(const grpc::Status& status, absl::string_view what) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      absl::StrCat(what, ": ", status.error_message()));
}

}  // namespace

absl::StatusOr<std::string> ReadRunToken(const std::string& token_file) {
  if (const char* env = std::getenv("SPOTRAIN_TOKEN"); env != nullptr && *env != '\0') {
    return std::string(absl::StripAsciiWhitespace(env));
  }
  if (!token_file.empty()) {
    auto contents = common::ReadFile(token_file);
    if (!contents.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot read the run token: ", contents.status().message()));
    }
    std::string token(absl::StripAsciiWhitespace(*contents));
    if (token.empty()) {
      return absl::FailedPreconditionError(absl::StrCat("token file ", token_file, " is empty"));
    }
    return token;
  }
  return absl::FailedPreconditionError(
      "no run token: set SPOTRAIN_TOKEN or pass --token-file (the coordinator writes one to "
      "<state-dir>/token when it is given none)");
}

absl::StatusOr<std::unique_ptr<CoordinatorClient>> CoordinatorClient::Create(
    const std::string& target, const ClientOptions& options) {
  if (target.empty() || target.find(':') == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("coordinator address \"", target, "\" must be HOST:PORT"));
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (options.tls_ca.empty()) {
    credentials = grpc::InsecureChannelCredentials();
  } else {
    grpc::SslCredentialsOptions ssl;
    ASSIGN_OR_RETURN(ssl.pem_root_certs, common::ReadFile(options.tls_ca));
    if (!options.tls_cert.empty()) {
      ASSIGN_OR_RETURN(ssl.pem_cert_chain, common::ReadFile(options.tls_cert));
      ASSIGN_OR_RETURN(ssl.pem_private_key, common::ReadFile(options.tls_key));
    }
    credentials = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments args;
  // Reconnect fast after a coordinator restart; keep idle session streams alive.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  // A restarted coordinator must be found within the re-join window (2 x heartbeat
  // timeout): retry the connection at least every half second while it is down.
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 500);
  // gRPC's default 30 s DNS cooldown would delay reaching a restarted coordinator.
  args.SetInt(GRPC_ARG_DNS_MIN_TIME_BETWEEN_RESOLUTIONS_MS, 500);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  auto channel = grpc::CreateCustomChannel(target, credentials, args);
  return std::unique_ptr<CoordinatorClient>(
      new CoordinatorClient(target, options, std::move(channel)));
}

CoordinatorClient::CoordinatorClient(std::string target, ClientOptions options,
                                     std::shared_ptr<grpc::Channel> channel)
    : target_(std::move(target)),
      options_(std::move(options)),
      channel_(std::move(channel)),
      stub_(proto::Coordinator::NewStub(channel_)) {}

CoordinatorClient::~CoordinatorClient() { CloseSession(); }

void CoordinatorClient::Authorize(grpc::ClientContext& context, absl::Duration timeout) const {
  context.AddMetadata(kTokenHeader, options_.token);
  if (timeout != absl::InfiniteDuration()) {
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  }
}

absl::StatusOr<proto::JoinResponse> CoordinatorClient::Join(const proto::JoinRequest& request,
                                                            bool wait_for_ready) {
  grpc::ClientContext context;
  Authorize(context, options_.rpc_timeout);
  context.set_wait_for_ready(wait_for_ready);
  proto::JoinResponse response;
  RETURN_IF_ERROR(
      FromGrpc(stub_->Join(&context, request, &response), absl::StrCat("join ", target_)));
  return response;
}

absl::Status CoordinatorClient::OpenSession(uint64_t worker_id, Handler on_message,
                                            EndHandler on_end) {
  CloseSession();
  auto context = std::make_unique<grpc::ClientContext>();
  Authorize(*context, absl::InfiniteDuration());
  std::shared_ptr<Stream> stream(stub_->Session(context.get()).release());
  {
    absl::MutexLock lock(&write_mu_);
    session_context_ = std::move(context);
    session_ = stream;
    writes_done_ = false;
  }
  proto::WorkerMessage hello;
  hello.mutable_hello()->set_worker_id(worker_id);
  if (!Send(hello)) {
    grpc::Status status = stream->Finish();
    absl::MutexLock lock(&write_mu_);
    session_.reset();
    session_context_.reset();
    return FromGrpc(
        status.ok() ? grpc::Status(grpc::StatusCode::UNAVAILABLE, "stream closed") : status,
        "session");
  }
  // The reader owns a reference to the stream, so CloseSession can drop ours safely after
  // joining it.
  reader_ =
      std::thread([this, stream, on_message = std::move(on_message), on_end = std::move(on_end)] {
        proto::CoordinatorMessage message;
        while (stream->Read(&message)) on_message(message);
        {
          absl::MutexLock lock(&write_mu_);
          writes_done_ = true;
        }
        on_end(stream->Finish());
      });
  return absl::OkStatus();
}

bool CoordinatorClient::Send(const proto::WorkerMessage& message) {
  absl::MutexLock lock(&write_mu_);
  if (session_ == nullptr || writes_done_) return false;
  if (!session_->Write(message)) {
    writes_done_ = true;
    return false;
  }
  return true;
}

void CoordinatorClient::CloseSession() {
  {
    absl::MutexLock lock(&write_mu_);
    if (session_ == nullptr) return;
    writes_done_ = true;
    session_context_->TryCancel();
  }
  if (reader_.joinable()) reader_.join();
  absl::MutexLock lock(&write_mu_);
  session_.reset();
  session_context_.reset();
}

absl::Status CoordinatorClient::KvSet(int64_t epoch, const std::string& key,
                                      const std::string& value) {
  grpc::ClientContext context;
  Authorize(context, options_.rpc_timeout);
  proto::KvSetRequest request;
  request.set_epoch(epoch);
  request.set_key(key);
  request.set_value(value);
  proto::KvSetResponse response;
  return FromGrpc(stub_->KvSet(&context, request, &response), absl::StrCat("kv set ", key));
}

absl::StatusOr<std::string> CoordinatorClient::KvGet(int64_t epoch, const std::string& key,
                                                     absl::Duration wait) {
  grpc::ClientContext context;
  Authorize(context, options_.rpc_timeout + wait);
  proto::KvGetRequest request;
  request.set_epoch(epoch);
  request.set_key(key);
  request.set_wait_ms(
      static_cast<int32_t>(std::min<int64_t>(absl::ToInt64Milliseconds(wait), 300000)));
  proto::KvGetResponse response;
  RETURN_IF_ERROR(
      FromGrpc(stub_->KvGet(&context, request, &response), absl::StrCat("kv get ", key)));
  if (!response.found()) {
    return absl::DeadlineExceededError(
        absl::StrCat("rendezvous key ", key, " of epoch ", epoch, " was not set in time"));
  }
  return std::move(*response.mutable_value());
}

absl::Status CoordinatorKeyValue::Set(const std::string& key, const std::string& value) {
  return client_.KvSet(epoch_, key, value);
}

absl::StatusOr<std::string> CoordinatorKeyValue::Get(const std::string& key, absl::Duration wait) {
  return client_.KvGet(epoch_, key, wait);
}

}  // namespace spotrain::worker
