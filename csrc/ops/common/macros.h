#pragma once

// Per-element math shared by the CPU (.cpp) and CUDA (.cu) kernels: the same inline
// functions run on both, so the CPU tests exercise the arithmetic the GPU uses.
#ifdef __CUDACC__
#define CNNVIZ_HOST_DEVICE __host__ __device__
#else
#define CNNVIZ_HOST_DEVICE
#endif
