// bench/gpu/gpu_train.cu compiled for the CPU emulator (see cuda_emulation.h).
#include "bench/gpu/gpu_train.cu"
