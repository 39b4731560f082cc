// The simulator's C ABI (runtime.cpp), mirrored by kernels/sim/src/ffi.rs. Shaped like the
// driver calls the CUDA backend makes: a kernel handle, grid and block, dynamic shared bytes and
// cuLaunchKernel's `void** kernelParams` (one pointer per parameter, to its bytes).
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    uint32_t x, y, z;
} msim_dim3;

// Order in which the threads of a block run between two synchronisation points.
enum { MSIM_ORDER_SHUFFLED = 0, MSIM_ORDER_FORWARD = 1, MSIM_ORDER_REVERSE = 2 };
// Deliberate faults, for tests that prove the checks can fail.
enum { MSIM_MUTATE_SWAP_MMA_A12 = 1, MSIM_MUTATE_SKIP_CP_ASYNC_WAIT = 2, MSIM_MUTATE_BREAK_NF4_LOOKUP = 4 };

typedef struct {
    uint32_t order;
    uint32_t mutations;
    uint64_t seed;
    // Barrier site (numbered in file order in the module's "mutant" variant) to skip; -1: none.
    int32_t skip_barrier_site;
    // OS threads that run the launch's blocks (0 or 1: the calling thread alone). Results do not
    // depend on it: each block's schedule is a function of the seed and the block's index.
    uint32_t threads;
} msim_options;

typedef struct {
    const char* module;   // file stem in kernels/
    const char* variant;  // "" (default build), "f16" (-DMINISAM_MMA_F16), "mutant"
    const char* name;     // the kernel's name in the .cu
    uint32_t param_count;
    const uint32_t* param_sizes;
    // Barrier sites of the module (mutant variant only): their source lines.
    uint32_t barrier_sites;
    const uint32_t* barrier_site_lines;
} msim_kernel_info;

size_t msim_kernel_count(void);
// Fills `out` for kernel `index` (< msim_kernel_count()); returns 0, or -1 for a bad index.
int msim_kernel_info_at(size_t index, msim_kernel_info* out);
// Runs kernel `index` to completion on the calling thread. Returns 0, or -1 with a message in
// `err` (NUL-terminated, truncated to err_len).
int msim_launch(size_t index, msim_dim3 grid, msim_dim3 block, uint32_t shared_bytes, void** params,
                const msim_options* options, char* err, size_t err_len);

#ifdef __cplusplus
}
#endif
