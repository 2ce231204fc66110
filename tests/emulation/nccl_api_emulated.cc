// worker/nccl_api.cu compiled for the CPU emulator (see cuda_emulation.h; NCCL from
// nccl_emulated.cc).
#include "worker/nccl_api.cu"
