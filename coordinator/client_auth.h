// Who may talk to the coordinator: the run token (SPOTRAIN_TOKEN or --token-file) carried as
// the `x-spotrain-token` metadata of every RPC, and optional TLS through gRPC's SSL
// credentials. This small public header is for every client of the coordinator (worker,
// `spotrain status`, tests, the load bench) and for the coordinator itself (constant-time token
// comparison, server credentials). It defines no flags: binaries map their --token-file and
// --tls-* flags onto these structs. Thread-safe (no shared state).
#ifndef SPOTRAIN_COORDINATOR_CLIENT_AUTH_H_
#define SPOTRAIN_COORDINATOR_CLIENT_AUTH_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/grpcpp.h"

namespace spotrain::coordinator {

inline constexpr char kTokenMetadataKey[] = "x-spotrain-token";
inline constexpr char kTokenEnvVar[] = "SPOTRAIN_TOKEN";

// The run token: the contents of `token_file` (surrounding whitespace removed) when it is
// non-empty, else $SPOTRAIN_TOKEN. kNotFound when neither is given; kInvalidArgument for an
// empty token; the file's read error otherwise.
absl::StatusOr<std::string> ReadRunToken(const std::string& token_file);

// PEM file paths; all empty means plaintext.
struct TlsFiles {
  std::string ca;    // client: roots that verify the server; server: CA that verifies clients
  std::string cert;  // client: its certificate (mutual TLS); server: its certificate
  std::string key;   // private key of `cert`
};

// Client side: insecure credentials when `tls` is all empty, else SSL credentials.
// kInvalidArgument when cert and key are not given together; the read error of a file.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TlsFiles& tls);

// Server side: insecure when all empty; SSL needs cert and key; with `ca` the server requires
// and verifies client certificates.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsFiles& tls);

// A channel to HOST:PORT with the given credentials (keepalive pings every 10 s).
std::shared_ptr<grpc::Channel> ConnectToCoordinator(
    const std::string& address, const std::shared_ptr<grpc::ChannelCredentials>& credentials);

// Adds the token metadata to a client call.
void AttachToken(grpc::ClientContext* context, const std::string& token);

// Compares without leaking where the first difference is (the time depends only on the
// lengths).
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

}  // namespace spotrain::coordinator

#endif  // SPOTRAIN_COORDINATOR_CLIENT_AUTH_H_
