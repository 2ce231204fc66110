// worker/cuda_model.cu compiled for the CPU emulator (see cuda_emulation.h).
#include "worker/cuda_model.cu"
