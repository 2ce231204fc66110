#include "coordinator/client_auth.h"

#include <cstdlib>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/status_macros.h"

namespace spotrain::coordinator {

absl::StatusOr<std::string> ReadRunToken(const std::string& token_file) {
  std::string token;
  if (!token_file.empty()) {
    ASSIGN_OR_RETURN(token, common::ReadFile(token_file));
    token = std::string(absl::StripAsciiWhitespace(token));
    if (token.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("token file ", token_file, " is empty"));
    }
    return token;
  }
  const char* env = std::getenv(kTokenEnvVar);
  if (env == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("no run token: set ", kTokenEnvVar, " or pass --token-file"));
  }
  token = std::string(absl::StripAsciiWhitespace(env));
  if (token.empty()) return absl::InvalidArgumentError(absl::StrCat(kTokenEnvVar, " is empty"));
  return token;
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TlsFiles& tls) {
  if (tls.ca.empty() && tls.cert.empty() && tls.key.empty()) {
    return grpc::InsecureChannelCredentials();
  }
  if (tls.cert.empty() != tls.key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  grpc::SslCredentialsOptions options;
  if (!tls.ca.empty()) {
    ASSIGN_OR_RETURN(options.pem_root_certs, common::ReadFile(tls.ca));
  }
  if (!tls.cert.empty()) {
    ASSIGN_OR_RETURN(options.pem_cert_chain, common::ReadFile(tls.cert));
    ASSIGN_OR_RETURN(options.pem_private_key, common::ReadFile(tls.key));
  }
  return grpc::SslCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFiles& tls) {
  if (tls.ca.empty() && tls.cert.empty() && tls.key.empty()) {
    return grpc::InsecureServerCredentials();
  }
  if (tls.cert.empty() || tls.key.empty()) {
    return absl::InvalidArgumentError(
        "TLS on the coordinator needs --tls-cert and --tls-key (and optionally --tls-ca to "
        "require client certificates)");
  }
  grpc::SslServerCredentialsOptions options(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  ASSIGN_OR_RETURN(pair.cert_chain, common::ReadFile(tls.cert));
  ASSIGN_OR_RETURN(pair.private_key, common::ReadFile(tls.key));
  options.pem_key_cert_pairs.push_back(std::move(pair));
  if (!tls.ca.empty()) {
    ASSIGN_OR_RETURN(options.pem_root_certs, common::ReadFile(tls.ca));
    options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

std::shared_ptr<grpc::Channel> ConnectToCoordinator(
    const std::string& address, const std::shared_ptr<grpc::ChannelCredentials>& credentials) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  // Reconnect quickly after a coordinator restart (the defaults back off to 2 minutes).
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  args.SetInt(GRPC_ARG_DNS_MIN_TIME_BETWEEN_RESOLUTIONS_MS, 500);
  return grpc::CreateCustomChannel(address, credentials, args);
}

void AttachToken(grpc::ClientContext* context, const std::string& token) {
  context->AddMetadata(kTokenMetadataKey, token);
}

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  // Compare over the longer length so the time does not depend on the contents.
  const size_t n = std::max(a.size(), b.size());
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned char>(x ^ y);
  }
  return diff == 0;
}

}  // namespace spotrain::coordinator
