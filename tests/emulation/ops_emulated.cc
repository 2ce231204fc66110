// kernels/cuda/ops.cu compiled for the CPU emulator (see cuda_emulation.h).
#include "kernels/cuda/ops.cu"
