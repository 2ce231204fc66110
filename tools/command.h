// Subcommands of the `spotrain` command line. Each tools/<name>.cc registers one with
// SPOTRAIN_REGISTER_COMMAND; main.cc dispatches on argv[1]. Registration happens during
// static initialisation (single-threaded); lookups afterwards are read-only.
#ifndef SPOTRAIN_TOOLS_COMMAND_H_
#define SPOTRAIN_TOOLS_COMMAND_H_

#include <map>
#include <string>

namespace spotrain::tools {

struct Command {
  // One line for `spotrain --help`.
  const char* summary;
  // Receives argv with the subcommand removed (argv[0] is "spotrain <name>"); absl flags
  // are already parsed out of it; the remaining positional arguments follow. Returns the
  // process exit status.
  int (*run)(int argc, char** argv);
};

std::map<std::string, Command>& Commands();

struct CommandRegistrar {
  CommandRegistrar(const char* name, Command command) { Commands()[name] = command; }
};

}  // namespace spotrain::tools

#define SPOTRAIN_REGISTER_COMMAND(var, name, summary, fn) \
  static ::spotrain::tools::CommandRegistrar var(name, {summary, fn})

#endif  // SPOTRAIN_TOOLS_COMMAND_H_
