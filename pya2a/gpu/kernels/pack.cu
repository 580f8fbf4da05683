// pya2a device pack kernel: the local rearrangement step of a device all-to-all.
//
// One launch copies every block of one step: block i is lens[i] bytes from
// src + src_off[i] to dst + dst_off[i]. The table is int64[3 * n]: src_off[0..n),
// dst_off[0..n), lens[0..n). Each CUDA block holds blockDim.x / lanes groups of `lanes`
// threads (a whole block for long runs, one warp each for short ones, so that a table of
// thousands of 256-byte runs does not leave most threads of a block idle); a group copies
// one run at a time. Grid: x tiles the bytes of a run, y walks the runs (grid-stride in
// both, so any n and any length fit one launch). Each run is copied with span_copy
// (pya2a_device.cuh): the widest access both pointers allow, four vectors in flight per
// thread, loads before stores (src and dst may be the same allocation).

#include "pya2a_device.cuh"

extern "C" __global__ void pya2a_pack(const char* src, const i64* tab, char* dst, int n,
                                      int lanes) {
    const i64 groups = (i64)blockDim.x / lanes;
    const i64 lane = (i64)threadIdx.x % lanes;
    const i64 tid = (i64)blockIdx.x * lanes + lane;
    const i64 nth = (i64)gridDim.x * lanes;
    for (i64 i = (i64)blockIdx.y * groups + (i64)threadIdx.x / lanes; i < n;
         i += (i64)gridDim.y * groups) {
        const i64 len = tab[2 * (i64)n + i];
        if (len <= 0) continue;
        const char* s = src + tab[i];
        char* d = dst + tab[(i64)n + i];
        if (s == d) continue;
        span_copy(d, s, len, tid, nth);
    }
}
