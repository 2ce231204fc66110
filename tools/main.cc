// `spotrain <command> [flags] [args]`: dispatches to the subcommands in tools/*.cc.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/flags.h"
#include "tools/command.h"

namespace spotrain::tools {

std::map<std::string, Command>& Commands() {
  static auto* commands = new std::map<std::string, Command>();
  return *commands;
}

namespace {

void PrintUsage(FILE* out) {
  std::fprintf(out, "usage: spotrain <command> [flags] [args]\n\ncommands:\n");
  for (const auto& [name, command] : Commands()) {
    std::fprintf(out, "  %-14s %s\n", name.c_str(), command.summary);
  }
  std::fprintf(out,
               "\n`spotrain <command> --help` lists a command's flags "
               "(all flags: --helpfull).\n");
}

}  // namespace
}  // namespace spotrain::tools

int main(int argc, char** argv) {
  using spotrain::tools::Commands;
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0 ||
      std::strcmp(argv[1], "help") == 0) {
    spotrain::tools::PrintUsage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  auto it = Commands().find(argv[1]);
  if (it == Commands().end()) {
    std::fprintf(stderr, "spotrain: unknown command \"%s\"\n\n", argv[1]);
    spotrain::tools::PrintUsage(stderr);
    return 2;
  }
  std::string program = std::string("spotrain ") + argv[1];
  std::string name = argv[1];
  for (char& c : name) {
    if (c == '-') c = '_';
  }
  std::vector<char*> args;
  args.push_back(program.data());
  for (int i = 2; i < argc; ++i) args.push_back(argv[i]);
  // --help lists the flags defined in tools/<name>.cc (dashes in names become underscores).
  std::vector<std::string> positional = spotrain::common::ParseFlags(
      static_cast<int>(args.size()), args.data(),
      std::string(it->second.summary) + "\nusage: " + program + " [flags] [args]",
      "tools/" + name + ".cc");
  std::vector<char*> rest;
  for (std::string& s : positional) rest.push_back(s.data());
  return it->second.run(static_cast<int>(rest.size()), rest.data());
}
