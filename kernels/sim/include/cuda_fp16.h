// Stub for the simulator: cuda_fp16.h's scalar types and conversions are in minisam_sim.h, which
// every kernel translation unit includes first.
#pragma once
