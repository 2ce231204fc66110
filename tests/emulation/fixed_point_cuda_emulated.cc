// worker/fixed_point_cuda.cu compiled for the CPU emulator (see cuda_emulation.h).
#include "worker/fixed_point_cuda.cu"
