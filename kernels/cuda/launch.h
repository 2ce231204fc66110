// SPOTRAIN_LAUNCH(grid, block, stream, kernel)(args...): a kernel launch, written once for the
// two ways the CUDA sources are compiled.
//  - nvcc: `kernel<<<grid, block, 0, stream>>>(args...)`.
//  - SPOTRAIN_CUDA_EMULATION (g++, the CPU emulator of tests/emulation/): the kernel runs on the
//    host, one cooperative fiber per CUDA thread, before the launch returns; see
//    tests/emulation/cuda_emulation.h.
// The kernel comes last because its template arguments may hold commas; template arguments it
// deduces from `args` need not be written, as with the chevrons.
#ifndef SPOTRAIN_KERNELS_CUDA_LAUNCH_H_
#define SPOTRAIN_KERNELS_CUDA_LAUNCH_H_

#if defined(SPOTRAIN_CUDA_EMULATION)
#define SPOTRAIN_LAUNCH(grid, block, stream, ...) \
  ::spotrain::cuda_emulation::Launch(             \
      (grid), (block), (stream), #__VA_ARGS__,    \
      [&](auto&... spotrain_launch_args) { __VA_ARGS__(spotrain_launch_args...); })
#else
#define SPOTRAIN_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#endif

#endif  // SPOTRAIN_KERNELS_CUDA_LAUNCH_H_
